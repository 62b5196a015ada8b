"""Training building blocks: layer-wise LR decay groups, freezing, EMA, loss and schedule, against hand values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.towers import build_tower
from kaggle_i2p.train.recipe import (
    ModelEMA,
    cosine_embedding_loss,
    freeze_lowest,
    layer_ids,
    llrd_param_groups,
    set_head_only,
    warmup_cosine,
)


@pytest.fixture
def towers(toy_manifest):
    return {spec.name: build_tower(spec) for spec in load_manifest(toy_manifest).towers}


def test_layer_ids_for_timm_and_open_clip_vits(towers):
    ids, n_blocks = layer_ids(towers["toy_timm_vit"])
    assert n_blocks == 6
    assert ids["backbone.cls_token"] == ids["backbone.pos_embed"] == ids["backbone.patch_embed.proj.weight"] == 0
    assert ids["backbone.blocks.0.attn.qkv.weight"] == 1 and ids["backbone.blocks.5.mlp.fc2.bias"] == 6
    assert ids["backbone.norm.weight"] == ids["head.3.weight"] == 7
    ids, n_blocks = layer_ids(towers["toy_open_clip_vit"])
    assert n_blocks == 2
    assert ids["backbone.conv1.weight"] == ids["backbone.class_embedding"] == ids["backbone.ln_pre.weight"] == 0
    assert ids["backbone.transformer.resblocks.1.mlp.c_fc.weight"] == 2
    assert ids["backbone.ln_post.weight"] == ids["backbone.proj"] == ids["head.weight"] == 3


def test_convnext_stages_are_ordered_block_by_block():
    reference = Path(__file__).resolve().parents[1] / "weights_manifest.yaml"
    spec = next(t for t in load_manifest(reference, check_files=False).towers if t.name == "convnext_xxl")
    with torch.device("meta"):
        tower = build_tower(spec)
    ids, n_blocks = layer_ids(tower)
    assert n_blocks == 3 + 4 + 30 + 3 + 3  # ConvNeXt-XXL depths, plus the downsampling of stages 1-3
    assert ids["backbone.trunk.stem.0.weight"] == 0
    assert ids["backbone.trunk.stages.0.blocks.2.mlp.fc1.weight"] == 3
    assert ids["backbone.trunk.stages.1.downsample.1.weight"] == 4  # before stage 1's first block
    assert ids["backbone.trunk.stages.1.blocks.0.mlp.fc1.weight"] == 5
    assert ids["backbone.trunk.head.norm.weight"] == ids["head.0.weight"] == n_blocks + 1


def test_llrd_groups_have_the_expected_learning_rates(towers):
    groups = llrd_param_groups(towers["toy_timm_vit"], lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    by_name = {name: group for group in groups for name in group["names"]}
    assert by_name["head.3.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["backbone.blocks.5.attn.qkv.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(1e-3 * 0.5 ** 6)
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == pytest.approx(1e-3 * 0.5 ** 7)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["backbone.blocks.0.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(towers["toy_timm_vit"].parameters()))
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


def test_freezing_and_linear_probing(towers):
    model = towers["toy_timm_vit"]
    frozen = freeze_lowest(model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.blocks.1.attn.qkv.weight" not in trainable and "backbone.pos_embed" not in trainable
    assert "backbone.blocks.2.attn.qkv.weight" in trainable and "head.0.weight" in trainable
    assert frozen == sum(1 for n, _ in model.named_parameters() if n not in trainable)
    assert all("blocks.0." not in n for g in llrd_param_groups(model, 1e-3, 0.7) for n in g["names"])
    set_head_only(model, True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                         if n.startswith("head.")}
    set_head_only(model, False)
    assert all(p.requires_grad for p in model.parameters())


def test_ema_follows_its_closed_form():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = model[0].weight.detach().clone()
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model[1].num_batches_tracked += 5
    for _ in range(10):
        ema.update(model)
    expected = 1.0 + (start - 1.0) * 0.9 ** 10
    torch.testing.assert_close(ema.module[0].weight, expected)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)  # the average lags the raw weights
    assert int(ema.module[1].num_batches_tracked) == 5
    with pytest.raises(ValueError):
        ModelEMA(model, decay=1.0)


def test_ema_warmup_uses_the_smaller_early_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEMA(model, decay=0.9998, warmup=True)
    assert [ema.decay_at(s) for s in (0, 10, None)] == [pytest.approx(0.1), pytest.approx(11 / 20), 0.9998]
    assert ema.decay_at(10**6) == 0.9998
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # 0.1 * 0 + 0.9 * 1
    assert float(ema.module.weight) == pytest.approx(0.9)


def test_cosine_embedding_loss_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(cosine_embedding_loss(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(cosine_embedding_loss(a, a.flip(0))) == pytest.approx(1.0)
    # in-batch negatives: cos(pred_0, target_1) = 0.6, cos(pred_1, target_0) = 0.6; margin 0.5 -> 0.1 each
    pred = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    target = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    off = 0.8 * 0.6 + 0.6 * 0.8  # 0.96
    assert float(cosine_embedding_loss(pred, target, margin=0.5, negative_weight=1.0)) == pytest.approx(off - 0.5)
    assert float(cosine_embedding_loss(a, a.flip(0), mse_weight=1.0)) == pytest.approx(1.0 + 1.0)  # mse of e1, e2


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, min_scale=0.1) == pytest.approx(0.1)
    assert warmup_cosine(30, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 90)))


def test_the_configs_key_sets_are_its_dataclasses_fields():
    """Issue 35, part 4: the keys a training config may hold come from the dataclasses that hold them (no copies to
    keep in step); these are the documented keys."""
    from kaggle_i2p.train.config import LORA_KEYS, STAGE_KEYS, TEXT_MAP_KEYS, TOP_KEYS

    assert TOP_KEYS == {"work", "output", "seed", "cpu", "tower", "data", "loss", "optim", "ema", "precision",
                        "stages", "checkpoint_every", "log_every", "eval_at_start", "text_map"}
    assert TEXT_MAP_KEYS == {"clip_arch", "clip_checkpoint", "ridge", "batch_size", "max_prompts"}
    assert STAGE_KEYS == {"name", "epochs", "resolution", "head_only", "freeze_lowest", "batch_size", "lr",
                          "weight_decay", "optimizer", "layer_decay", "warmup", "min_lr_scale", "work", "sources",
                          "lora"}
    assert LORA_KEYS == {"blocks", "rank", "alpha", "dropout", "modules"}


def test_the_simple_sections_are_checked_from_their_annotations(tmp_path):
    """Issue 35, part 4: the data, loss and ema sections are validated from their dataclasses' annotations and
    marks (bool, int and float bounds, optional values, [low, high] pairs), every problem named at once."""
    from kaggle_i2p.testing import toy_training_config
    from kaggle_i2p.train.config import TrainConfigError, parse_train_config

    config = toy_training_config(tmp_path / "work", tmp_path / "out")
    good = parse_train_config(config, tmp_path / "train.yaml", check_files=False)
    assert good.data.eval_batch_size == 2 * good.data.batch_size and good.data.hflip is False
    config["data"] = {"batch_size": 0, "hflip": "no", "crop_scale": [0.9, 0.5], "color_jitter": 2,
                      "max_val_images": None, "surprise": 1}
    config["loss"] = {"margin": -2}
    config["ema"] = {"decay": 1.0, "warmup": 1}
    with pytest.raises(TrainConfigError) as caught:
        parse_train_config(config, tmp_path / "train.yaml", check_files=False)
    problems = caught.value.problems
    for line in ("data.batch_size: 0 must be an integer >= 1", "data.hflip: 'no' must be true or false",
                 "data.crop_scale: [0.9, 0.5] must be [low, high] with 0 < low <= high",
                 "data.color_jitter: 2 must be a number >= 0.0 and <= 1.0", "data.surprise: unknown key; allowed: ",
                 "loss.margin: -2 must be a number >= -1.0", "ema.decay: 1.0 must be a number >= 0.0 and < 1.0",
                 "ema.warmup: 1 must be true or false"):
        assert any(p.startswith(line) for p in problems), (line, problems)
    config["data"], config["loss"], config["ema"] = {"max_val_images": None}, None, {"decay": None}
    loaded = parse_train_config(config, tmp_path / "train.yaml", check_files=False)
    assert loaded.data.max_val_images is None and loaded.ema_decay == 0.0 and loaded.loss.margin == 0.0


@pytest.mark.parametrize("check_files", [True, False])
def test_an_unset_variable_in_the_text_map_paths_is_a_problem_not_a_traceback(tmp_path, monkeypatch, check_files):
    from kaggle_i2p.testing import build_toy_training_set, toy_training_config
    from kaggle_i2p.train.config import TrainConfigError, parse_train_config

    monkeypatch.delenv("I2P_NOT_SET", raising=False)
    build_toy_training_set(tmp_path / "work", n_prompts=4)
    config = toy_training_config(tmp_path / "work", tmp_path / "out", text_map={
        "clip_arch": "${I2P_NOT_SET}/c.json", "clip_checkpoint": "${I2P_NOT_SET}/c.pt"})
    config["tower"]["head"] = {"type": "linear", "init": "text_map"}
    with pytest.raises(TrainConfigError) as caught:
        parse_train_config(config, tmp_path / "config.yaml", check_files=check_files)
    unset = sorted(p.split(":")[0] for p in caught.value.problems if "I2P_NOT_SET is not set" in p)
    assert unset == ["text_map.clip_arch", *(["text_map.clip_checkpoint"] if check_files else [])]
