"""Training what the winners trained (issue 25): an HF BLIP-2 tower (vision + Q-Former) from a whole saved model,
LoRA adapters merged at export, staged datasets, and the text-map head; each trains on the toy set, resumes
bit-identically, and its export serves the vectors the trainer computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf
import yaml

from kaggle_i2p.inference.predict import run_prediction
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.towers import build_tower, checkpoint_fit, load_initial_weights
from kaggle_i2p.testing import (
    CLIP_MEAN,
    CLIP_STD,
    build_toy_training_set,
    tiny_hf_config,
    toy_training_config,
    write_tiny_hf_model,
)
from kaggle_i2p.train.checkpoint import read_checkpoint
from kaggle_i2p.train.config import load_train_config
from kaggle_i2p.train.export import export_checkpoint
from kaggle_i2p.train.recipe import layer_ids, llrd_param_groups
from kaggle_i2p.train.trainer import train

IMAGE = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash"}


@pytest.fixture(scope="module")
def toy_work(tmp_path_factory) -> Path:
    return build_toy_training_set(tmp_path_factory.mktemp("toy_work"))


def _write(tmp: Path, config: dict, name: str = "run") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _served_equals_trained(result, exported, work: Path, tmp: Path) -> None:
    """The export, served through a manifest, predicts the validation vectors the trainer evaluated."""
    trained = np.load(result.output / "best_val_predictions.npz")
    images = tmp / "served_images"
    images.mkdir(exist_ok=True)
    for image_id in trained["ids"]:
        (images / f"{image_id}.png").write_bytes((work / "images" / f"{image_id}.png").read_bytes())
    run = run_prediction(images, load_manifest(exported.manifest), device="cpu", progress=False)
    assert list(run.ids) == list(trained["ids"])
    cosines = np.sum(run.embeddings * trained["predictions"], axis=1)
    assert cosines.min() >= 0.9999, cosines
    assert np.std(run.embeddings, axis=0).max() > 1e-3  # not one vector for every image


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    """A tiny BLIP-2 saved whole by save_pretrained (vision, Q-Former and the OPT language model)."""
    folder = write_tiny_hf_model(tmp_path_factory.mktemp("blip2") / "blip2", "blip2")
    torch.manual_seed(3)
    model = hf.Blip2Model(hf.Blip2Config.from_dict(tiny_hf_config("blip2")))
    with torch.no_grad():  # BLIP-2's own initialisation barely lets a tiny model see the image: make it look
        model.vision_model.embeddings.patch_embedding.weight.normal_(0, 0.3)
    model.save_pretrained(str(folder), max_shard_size="100KB")  # shards and their index, as the real one is saved
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    return folder, model


def test_blip2_query_tower_trains_from_a_whole_saved_model_and_its_export_serves_as_trained(
        blip2, toy_work, tmp_path):
    folder, model = blip2
    tower_entry = {"name": "blip2_q", "library": "transformers", "arch": str(folder), "features": "query_mean",
                   "init": str(folder / "model.safetensors.index.json"), "head": {"type": "linear"},
                   "image": IMAGE}
    config = toy_training_config(toy_work, tmp_path / "run", eval_at_start=False, tower=tower_entry,
                                 data={"val_fold": 0, "batch_size": 16, "num_workers": 0},
                                 stages=[{"name": "ft", "epochs": 1, "resolution": 64, "freeze_lowest": 1}])
    path = _write(tmp_path, config)
    spec = load_train_config(path).tower

    tower = build_tower(spec)  # the image side of the whole file: vision model, query tokens, Q-Former
    notes = load_initial_weights(tower, folder / "model.safetensors.index.json")
    assert "image side" in " ".join(notes)
    own = model.state_dict()
    for key, value in tower.backbone.state_dict().items():
        assert torch.equal(value, own[key]), key

    ids, n_blocks = layer_ids(tower)  # the library's layer groups: vision layers, then the Q-Former's
    assert n_blocks == 2 + 1 + 2
    assert ids["backbone.vision_model.embeddings.patch_embedding.weight"] == 0
    assert ids["backbone.vision_model.encoder.layers.1.mlp.fc1.weight"] == 2
    assert ids["backbone.query_tokens"] == ids["backbone.qformer.layernorm.weight"] == 3
    assert ids["backbone.qformer.encoder.layer.1.attention.attention.query.weight"] == 5
    assert ids["head.weight"] == 6
    groups = {g["layer"]: g["lr_scale"] for g in llrd_param_groups(tower, 1e-3, 0.5)}
    assert groups[3] == pytest.approx(0.5 ** 3) and groups[6] == 1.0

    result = train(path)
    assert result.history[-1]["global_step"] == 2  # 41 training prompts, batch 16
    last = read_checkpoint(result.last)
    start = {k: v for k, v in tower.state_dict().items()}
    moved = {k for k, v in last["model"].items() if not torch.equal(v, start[k])}
    assert "backbone.qformer.encoder.layer.1.output_query.dense.weight" in moved  # the Q-Former trained
    assert not any(k.startswith("backbone.vision_model.encoder.layers.0.") for k in moved)  # frozen: freeze_lowest 1

    exported = export_checkpoint(result.best, tmp_path / "export")
    served = load_manifest(exported.manifest).towers[0]
    assert checkpoint_fit(served).as_saved  # the export is read as it is, no layout guessed
    _served_equals_trained(result, exported, toy_work, tmp_path)


class Stop(Exception):
    """A run stopped on purpose, just after a checkpoint."""


def _stop_at(path: Path, step: int, monkeypatch) -> dict:
    """Train until the checkpoint at optimizer step `step` (as if killed just after it); returns that checkpoint."""
    from kaggle_i2p.train import trainer as trainer_module

    save = trainer_module.Trainer._save

    def save_then_stop(self, name, optimizer=None, stage=None):
        save(self, name, optimizer, stage)
        if name == trainer_module.LAST and optimizer is not None and self.progress.global_step == step:
            raise Stop

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "_save", save_then_stop)
        with pytest.raises(Stop):
            train(path)
    state = read_checkpoint(Path(yaml.safe_load(path.read_text())["output"]) / "last.pt")
    assert state["progress"]["global_step"] == step
    return state


def _stopped_then_resumed(path: Path, step: int, monkeypatch) -> None:
    """Stop the run just after the checkpoint at `step`, then rerun the same config to resume it."""
    _stop_at(path, step, monkeypatch)
    train(path)


def _assert_same_run(a: Path, b: Path) -> None:
    """Two runs' last checkpoints hold the same weights, EMA and history, bit for bit."""
    first, second = read_checkpoint(a / "last.pt"), read_checkpoint(b / "last.pt")
    for part in ("model", "ema"):
        assert first[part].keys() == second[part].keys()
        for key in first[part]:
            assert torch.equal(first[part][key], second[part][key]), (part, key)
    unstable = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in unstable} for r in first["history"]] == [
        {k: v for k, v in r.items() if k not in unstable} for r in second["history"]]


@pytest.fixture(scope="module")
def pretraining_work(tmp_path_factory) -> Path:
    """Another dataset folder (other synthetic prompts; the 7 sample images again, whose prompts validate)."""
    return build_toy_training_set(tmp_path_factory.mktemp("pretraining"), n_prompts=30, seed=7)


def test_staged_datasets_switch_at_the_stage_boundary_and_resume_mid_stage_on_the_right_set(
        toy_work, pretraining_work, tmp_path, monkeypatch):
    from kaggle_i2p.train import trainer as trainer_module

    stages = [{"name": "pretrain", "epochs": 2, "resolution": 32, "work": str(pretraining_work)},
              {"name": "finetune", "epochs": 2, "resolution": 32, "sources": ["toy"], "lr": 1e-3}]
    configs = {name: _write(tmp_path, toy_training_config(toy_work, tmp_path / name, stages=stages,
                                                          checkpoint_every=1), name)
               for name in ("reference", "resumed")}
    read = []  # (stage's dataset folder, rows) of every training epoch's images
    images = trainer_module.TrainImages

    def spy(data, spec, resolution, augment=None, seed=0, epoch=0):
        if augment is not None:
            read.append(data)
        return images(data, spec, resolution, augment, seed, epoch)

    monkeypatch.setattr(trainer_module, "TrainImages", spy)
    reference = train(configs["reference"])
    pre, fine = read[0], read[-1]
    assert [d.work for d in read] == [pretraining_work] * 2 + [toy_work] * 2
    validation = load_train_config(configs["reference"])
    import pandas as pd

    own = pd.read_parquet(toy_work / "index.parquet")
    val_prompts = set(own["prompt"][own["fold"] == 0])
    other = pd.read_parquet(pretraining_work / "index.parquet")
    pre_prompts = set(other["prompt"].iloc[pre.prompt_rows])
    assert pre_prompts and not pre_prompts & val_prompts  # the validation prompts never train, in any folder
    assert len(pre_prompts) == len(set(other["prompt"]) - val_prompts)  # every other prompt of that folder does
    fine_rows = own.iloc[fine.prompt_rows]
    assert set(fine_rows["source"]) == {"toy"} and 0 not in set(fine_rows["fold"])
    assert {r["val_images"] for r in reference.history} == {int((own["fold"] == validation.data.val_fold).sum())}

    read.clear()
    steps_per_epoch = reference.history[1]["global_step"] - reference.history[0]["global_step"]
    pretrain_steps = 2 * (len(pre_prompts) // 8)
    _stopped_then_resumed(configs["resumed"], pretrain_steps + steps_per_epoch + 1, monkeypatch)
    assert [d.work for d in read] == [pretraining_work] * 2 + [toy_work] * 2 + [toy_work]  # resumed on its set
    _assert_same_run(tmp_path / "resumed", tmp_path / "reference")


def _open_clip_tower(folder: Path):
    import json

    from kaggle_i2p.core.validate import Problems
    from kaggle_i2p.manifest.parse import ParseContext, parse_tower
    from kaggle_i2p.testing import TINY_OPEN_CLIP_CONFIG

    (folder / "tiny.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    problems = Problems()
    entry = {"name": "oc", "library": "open_clip", "arch": "tiny.json", "head": {"type": "linear"}, "weight": 1.0,
             "image": {**IMAGE, "resolutions": [64]}}
    spec = parse_tower(entry, 0, ParseContext(folder, problems, check_files=False, needs_checkpoint=False))
    assert not problems.items
    return build_tower(spec)


def _timm_tower(folder: Path | None = None):
    from kaggle_i2p.train.config import parse_train_config

    return build_tower(parse_train_config(toy_training_config("/w", "/o"), "/c.yaml", check_files=False).tower)


@pytest.mark.parametrize("make,blocks,adapted", [
    (_timm_tower, (0.4, 0.8), {f"blocks.{b}.{m}" for b in (2, 3) for m in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                           "mlp.fc2")}),
    (_open_clip_tower, (2, 2), {"transformer.resblocks.1.attn", "transformer.resblocks.1.mlp.c_fc",
                                "transformer.resblocks.1.mlp.c_proj"})])
def test_merged_lora_adapters_compute_what_the_adapted_tower_did(make, blocks, adapted, tmp_path):
    """peft's adapters on a block range (open_clip's MultiheadAttention adapted whole), trained away from zero,
    merged: the plain tower computes what the adapted one did, and has a plain tower's keys."""
    from kaggle_i2p.train.lora import Adapters, adapter_targets, add_adapters, block_range, merge_adapters

    torch.manual_seed(0)
    tower = make(tmp_path).eval()
    plain_keys = set(tower.state_dict())
    first, last = block_range(blocks, layer_ids(tower)[1])
    targets = adapter_targets(tower, first, last)
    assert set(targets) == adapted
    add_adapters(tower, Adapters(targets, rank=4, alpha=8.0, dropout=0.0, seed=1))
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a trained adapter is not
                param.normal_(0, 0.2)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        adapted_out = tower(images)
        assert merge_adapters(tower.backbone)
        merged_out = tower(images)
    assert set(tower.state_dict()) == plain_keys
    assert (adapted_out - merged_out).abs().max() <= 1e-5 * adapted_out.abs().max()
    plain = make(tmp_path).eval()
    plain.load_state_dict(tower.state_dict())
    assert not torch.allclose(plain(images), make(tmp_path).eval()(images))  # the merge moved the weights


def _lora_config(toy_work: Path, output: Path, **overrides) -> dict:
    stages = [{"name": "lp", "epochs": 1, "resolution": 32, "head_only": True, "lr": 1e-2},
              {"name": "lora", "epochs": 2, "resolution": 32, "lora": {"blocks": [0.4, 0.8], "rank": 4, "alpha": 8},
               "lr": 5e-3},
              {"name": "top", "epochs": 1, "resolution": 32, "lr": 1e-3}]
    return toy_training_config(toy_work, output, stages=stages, checkpoint_every=1, **overrides)


def test_a_lora_stage_trains_its_range_through_adapters_and_its_export_is_the_merged_tower(
        toy_work, tmp_path, monkeypatch):
    """blocks [0.4, 0.8] of test_vit's 6: 1-2 frozen, 3-4 through adapters, 5-6 fully; a checkpoint taken in the
    LoRA stage keeps the base weights and the adapters apart, and its export (merged) serves what the adapted
    EMA computed."""
    from kaggle_i2p.inference.images import decode_image, make_view
    from kaggle_i2p.train.lora import Adapters, add_adapters, join_state

    path = _write(tmp_path, _lora_config(toy_work, tmp_path / "run"))
    mid = _stop_at(path, 5 + 6, monkeypatch)  # LP's 5 steps, then in the LoRA stage's second epoch
    adapters = mid["adapters"]
    assert adapters["stage"] == 1 and adapters["layout"]["rank"] == 4
    assert set(adapters["layout"]["targets"]) == {f"blocks.{b}.{m}" for b in (2, 3)
                                                  for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(mid["model"]) == set(_timm_tower().state_dict())  # a plain tower's keys: the frozen base
    assert all("lora_" in k for k in adapters["model"]) and adapters["ema"].keys() == adapters["model"].keys()
    assert any(v.abs().max() > 0 for k, v in adapters["model"].items() if "lora_B" in k)  # the adapters trained

    exported = export_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "export")
    spec = load_manifest(exported.manifest).towers[0]
    adapted = build_tower(spec)  # the trained architecture (native at 32 px), the adapted EMA's weights
    adapted.load_state_dict(mid["ema"])
    add_adapters(adapted, Adapters(**{**adapters["layout"], "targets": tuple(adapters["layout"]["targets"])}))
    adapted.load_state_dict(join_state(adapted, mid["ema"], adapters["ema"]))
    adapted.eval()
    ids = ["toy000_0", "toy004_0", "20057f34d"]
    views = torch.cat([make_view(decode_image(toy_work / "images" / f"{i}.png").unsqueeze(0), spec.image, 32)
                       for i in ids])
    with torch.no_grad():
        want = torch.nn.functional.normalize(adapted(views), dim=-1).numpy()
    images = tmp_path / "served"
    images.mkdir()
    for image_id in ids:
        (images / f"{image_id}.png").write_bytes((toy_work / "images" / f"{image_id}.png").read_bytes())
    run = run_prediction(images, load_manifest(exported.manifest), device="cpu", progress=False)
    assert list(run.ids) == sorted(ids)
    order = [ids.index(i) for i in run.ids]
    assert np.sum(run.embeddings * want[order], axis=1).min() >= 0.9999

    train(path)  # resumed in the LoRA stage, then the top stage on the merged tower
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last["adapters"] is None and set(last["model"]) == set(mid["model"])
    lp = [r for r in last["history"] if r["stage"] == "lp"]
    assert lp and last["history"][-1]["stage"] == "top"
    torch.manual_seed(0)  # the run's initial weights (init: none, seed 0), LP trained only the head
    initial = _timm_tower().state_dict()
    for block in range(6):  # in the LoRA stage: blocks 1-4 keep their base weights (3-4 train through adapters)
        key = f"backbone.blocks.{block}.mlp.fc2.weight"
        assert torch.equal(mid["model"][key], initial[key]) == (block < 4), key


def test_resume_is_bit_identical_with_lora_and_staged_data(toy_work, pretraining_work, tmp_path, monkeypatch):
    config = _lora_config(toy_work, tmp_path / "ref")
    config["stages"][0]["work"] = str(pretraining_work)
    config["stages"][1]["sources"] = ["toy"]
    reference = _write(tmp_path, config, "ref")
    resumed = _write(tmp_path, {**config, "output": str(tmp_path / "resumed")}, "resumed")
    train(reference)
    lp_steps = read_checkpoint(tmp_path / "ref" / "last.pt")["history"][1]["global_step"]
    _stopped_then_resumed(resumed, lp_steps + 5, monkeypatch)  # mid-way through the LoRA stage
    _assert_same_run(tmp_path / "resumed", tmp_path / "ref")


def test_lora_and_staged_config_errors_name_their_fields(toy_work, tmp_path):
    from kaggle_i2p.train.config import TrainConfigError
    from kaggle_i2p.train.trainer import Trainer

    stages = [{"name": "a", "epochs": 1, "resolution": 32, "head_only": True, "lora": {"blocks": [0.8, 0.4]}},
              {"name": "b", "epochs": 1, "resolution": 32, "lora": {"blocks": [2, 3], "rank": 0, "colour": 1},
               "work": str(tmp_path / "nowhere"), "sources": "toy"}]
    with pytest.raises(TrainConfigError) as caught:
        load_train_config(_write(tmp_path, toy_training_config(toy_work, tmp_path / "o", stages=stages)))
    message = str(caught.value)
    for field in ("stages[0].head_only", "stages[0].lora.blocks", "stages[1].lora.rank",
                  "stages[1].lora.colour: unknown key", "stages[1].work", "stages[1].sources"):
        assert field in message, (field, message)

    beyond = [{"name": "a", "epochs": 1, "resolution": 32, "lora": {"blocks": [5, 9]}},
              {"name": "b", "epochs": 1, "resolution": 32, "lora": {"blocks": [1, 2], "modules": ["nothing"]}}]
    with pytest.raises(TrainConfigError) as caught:  # before any weights or data: the meta-device tower's blocks
        Trainer(load_train_config(_write(tmp_path, toy_training_config(toy_work, tmp_path / "o2", stages=beyond))))
    message = str(caught.value)
    assert "stages[0].lora.blocks: [5, 9] gives blocks 5..9, but test_vit has blocks 1..6" in message
    assert "stages[1].lora.modules: 'nothing' name(s) no Linear or MultiheadAttention module of test_vit" in message

    unknown_source = [{"name": "a", "epochs": 1, "resolution": 32, "sources": ["coyo"]}]
    from kaggle_i2p.train.data import TrainingDataError

    with pytest.raises(TrainingDataError, match="no rows of source.s. coyo .sources present: kaggle_sample, toy."):
        Trainer(load_train_config(_write(tmp_path, toy_training_config(toy_work, tmp_path / "o3",
                                                                        stages=unknown_source))))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny open_clip CLIP saved whole (image and text towers): the image tower's init and the text map's CLIP."""
    import json

    import open_clip

    from kaggle_i2p.testing import TINY_OPEN_CLIP_CONFIG

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "tiny_clip.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    torch.manual_seed(11)
    torch.save(open_clip.CLIP(**TINY_OPEN_CLIP_CONFIG).state_dict(), folder / "clip.pt")
    return folder


def _text_map_config(toy_work: Path, output: Path, clip: Path, ridge: float) -> dict:
    return toy_training_config(
        toy_work, output, checkpoint_every=1,
        tower={"name": "mapped", "library": "open_clip", "arch": str(clip / "tiny_clip.json"),
               "init": str(clip / "clip.pt"), "head": {"type": "linear", "init": "text_map"},
               "image": IMAGE},
        text_map={"clip_arch": str(clip / "tiny_clip.json"), "clip_checkpoint": str(clip / "clip.pt"),
                  "ridge": ridge, "batch_size": 16},
        stages=[{"name": "ft", "epochs": 2, "resolution": 64, "lr": 1e-3}])


@pytest.mark.parametrize("ridge", [0.0, 0.05])
def test_the_text_map_head_starts_at_its_least_squares_optimum(toy_work, tiny_clip, tmp_path, ridge):
    """The head's weight is argmin |XW - Y|² + λ|W|² over the training prompts (X: their CLIP text embeddings, Y:
    their targets), as numpy's lstsq finds it; the map's validation cosine is in the metrics."""
    import json

    import pandas as pd

    from kaggle_i2p.bank.build import clip_embedder
    from kaggle_i2p.core.ensemble import l2_normalize
    from kaggle_i2p.train.trainer import Trainer

    config = load_train_config(_write(tmp_path, _text_map_config(toy_work, tmp_path / "run", tiny_clip, ridge)))
    trainer = Trainer(config)
    weight = trainer.tower.head.weight.detach().double().numpy().T
    assert torch.count_nonzero(trainer.tower.head.bias) == 0
    assert torch.equal(trainer.ema.module.head.weight, trainer.tower.head.weight)  # the EMA starts there too

    index = pd.read_parquet(toy_work / "index.parquet")
    data = trainer.data
    rows = data.prompt_rows[data.prompt_offsets[:-1]]
    embed = clip_embedder(str(tiny_clip / "tiny_clip.json"), tiny_clip / "clip.pt", "cpu", 64)
    x = embed(index["prompt"].iloc[rows].tolist()).astype(np.float64)
    y = l2_normalize(data.targets[rows]).astype(np.float64)
    assert len(set(index["prompt"].iloc[rows])) == len(rows) == data.n_train_prompts
    lam = ridge * np.trace(x.T @ x) / x.shape[1]
    best = np.linalg.lstsq(np.vstack([x, np.sqrt(lam) * np.eye(x.shape[1])]),
                           np.vstack([y, np.zeros((x.shape[1], y.shape[1]))]), rcond=None)[0]

    def objective(w):
        return np.sum((x @ w - y) ** 2) + lam * np.sum(w ** 2)

    assert objective(weight) == pytest.approx(objective(best), rel=1e-4)
    assert objective(weight) < objective(best + 1e-3 * np.random.default_rng(0).normal(size=best.shape))
    if ridge:  # a unique optimum
        np.testing.assert_allclose(weight, best, rtol=1e-3, atol=1e-4)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["type"] == "text_map"]
    val = data.val_rows
    want = np.mean(np.sum(l2_normalize(embed(index["prompt"].iloc[val].tolist()).astype(np.float64) @ best)
                          * l2_normalize(data.targets[val]), axis=1))
    assert record["prompts"] == data.n_train_prompts and record["val_images"] == len(val)
    assert record["val_cosine"] == pytest.approx(want, abs=2e-3)


def test_a_text_map_run_resumes_bit_identically_and_exports(toy_work, tiny_clip, tmp_path, monkeypatch):
    reference = _write(tmp_path, _text_map_config(toy_work, tmp_path / "ref", tiny_clip, 0.01), "ref")
    resumed = _write(tmp_path, _text_map_config(toy_work, tmp_path / "resumed", tiny_clip, 0.01), "resumed")
    result = train(reference)
    _stopped_then_resumed(resumed, 7, monkeypatch)
    _assert_same_run(tmp_path / "resumed", tmp_path / "ref")
    import json

    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "text_map" for r in records) == 1  # fitted once: the resumed run kept the head
    exported = export_checkpoint(result.best, tmp_path / "export")
    assert "init" not in load_manifest(exported.manifest).towers[0].to_dict()["head"]
    _served_equals_trained(result, exported, toy_work, tmp_path)


def test_text_map_config_errors_name_their_fields(toy_work, tiny_clip, tmp_path):
    from kaggle_i2p.train.config import TrainConfigError
    from kaggle_i2p.train.trainer import Trainer

    config = toy_training_config(toy_work, tmp_path / "o")
    config["tower"]["head"] = {"type": "mlp", "hidden": 32, "init": "text_map"}
    with pytest.raises(TrainConfigError) as caught:
        load_train_config(_write(tmp_path, config))
    assert "text_map: is required with tower.head.init: text_map" in str(caught.value)
    assert "tower.head.type: must be linear" not in str(caught.value)  # one problem at a time: the section first
    config["text_map"] = {"clip_arch": str(tiny_clip / "tiny_clip.json"), "clip_checkpoint": "missing.pt",
                          "ridge": -1}
    with pytest.raises(TrainConfigError) as caught:
        load_train_config(_write(tmp_path, config))
    for field in ("tower.head.type: must be linear", "text_map.clip_checkpoint", "text_map.ridge"):
        assert field in str(caught.value), field
    config["tower"]["head"] = {"type": "linear", "init": "text_map"}  # test_vit's 64-d features, CLIP's 32-d text
    config["text_map"] = {"clip_arch": str(tiny_clip / "tiny_clip.json"),
                          "clip_checkpoint": str(tiny_clip / "clip.pt")}
    with pytest.raises(TrainConfigError, match="text_map maps .*32-d text embeddings, but the head takes 64-d"):
        Trainer(load_train_config(_write(tmp_path, config)))
    config["tower"]["head"] = {"type": "linear"}
    with pytest.raises(TrainConfigError, match="text_map: is only read with tower.head.init: text_map"):
        load_train_config(_write(tmp_path, config))


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_recipe_configs_validate_at_their_real_sizes_on_the_meta_device(tmp_path, monkeypatch):
    """configs/train_convnext_xxl_lora_staged.yaml (the 1st place's LoRA + staged data) and train_blip2_qformer.yaml
    parse, run every stage on the meta device, and train what they say: ConvNeXt-XXL with about half its parameters
    training in a LoRA stage, and BLIP-2's 39 vision layers + query tokens + 12 Q-Former layers as its blocks."""
    from kaggle_i2p.train.lora import Adapters, adapter_targets, add_adapters, block_range, set_trainable
    from kaggle_i2p.train.trainer import check_stage_adapters, check_stage_architectures

    blip2 = tmp_path / "blip2-opt-2.7b"
    blip2.mkdir()
    (blip2 / "config.json").write_text(hf.Blip2Config().to_json_string())  # Salesforce/blip2-opt-2.7b's image side
    (blip2 / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "convnext.bin").write_bytes(b"")
    monkeypatch.setenv("BLIP2_DIR", str(blip2))
    monkeypatch.setenv("CONVNEXT_XXL_WEIGHTS", str(tmp_path / "convnext.bin"))

    config = load_train_config(ROOT / "configs" / "train_convnext_xxl_lora_staged.yaml", check_files=False)
    reference = {t.name: t for t in load_manifest(ROOT / "weights_manifest.yaml", check_files=False).towers}
    for field in ("library", "arch", "head", "image", "native_resolution"):
        assert getattr(config.tower, field) == getattr(reference["convnext_xxl"], field), field
    assert [s.work is not None for s in config.stages] == [True, True, False, False]
    check_stage_architectures(config)
    check_stage_adapters(config)
    with torch.device("meta"):
        tower = build_tower(config.tower)
        n_blocks = layer_ids(tower)[1]
        first, last = block_range(config.stages[1].lora.blocks, n_blocks)
        targets = adapter_targets(tower, first, last)
        add_adapters(tower, Adapters(targets, 32, 32.0, 0.0, 0))
    trainable, total = set_trainable(tower, last)
    assert (n_blocks, first, last) == (43, 18, 34) and len(targets) == 2 * (last - first + 1)  # fc1, fc2 each
    assert 0.40 < trainable / total < 0.55, trainable / total  # the 1st place's 47%

    config = load_train_config(ROOT / "configs" / "train_blip2_qformer.yaml", check_files=False)
    check_stage_architectures(config)
    with torch.device("meta"):
        tower = build_tower(config.tower)
    ids, n_blocks = layer_ids(tower)
    assert n_blocks == 39 + 1 + 12 and tower.head.in_features == 768
    assert ids["backbone.vision_model.encoder.layers.29.mlp.fc1.weight"] == 30  # the first to train after 29 frozen


def _every_piece(tmp: Path, toy_work: Path, pretraining_work: Path, family: str, clip: Path, blip2_folder: Path,
                 output: str) -> dict:
    """A run with every new piece on: a staged dataset, a LoRA stage, a timm optimizer by name, and the text-map
    head (open_clip, whose attention is adapted as a whole) or BLIP-2's vision + Q-Former from its sharded save."""
    if family == "open_clip":
        tower = {"name": "all", "library": "open_clip", "arch": str(clip / "tiny_clip.json"),
                 "init": str(clip / "clip.pt"), "head": {"type": "linear", "init": "text_map"}, "image": IMAGE}
        extra = {"text_map": {"clip_arch": str(clip / "tiny_clip.json"), "clip_checkpoint": str(clip / "clip.pt"),
                              "ridge": 0.01}}
    else:
        tower = {"name": "all", "library": "transformers", "arch": str(blip2_folder), "features": "query_mean",
                 "init": str(blip2_folder / "model.safetensors.index.json"), "head": {"type": "linear"},
                 "image": IMAGE}
        extra = {}
    stages = [{"name": "pre", "epochs": 1, "resolution": 64, "work": str(pretraining_work), "optimizer": "madgrad",
               "lr": 1e-3},
              {"name": "lora", "epochs": 2, "resolution": 64, "sources": ["toy"],
               "lora": {"blocks": [2, 2] if family == "open_clip" else [2, 4], "rank": 4, "alpha": 8}}]
    return toy_training_config(toy_work, tmp / output, checkpoint_every=1, stages=stages, **extra, tower=tower)


@pytest.mark.parametrize("family", ["open_clip", "transformers"])
def test_resume_is_bit_identical_with_every_new_piece_on(family, toy_work, pretraining_work, tiny_clip, blip2,
                                                         tmp_path, monkeypatch):
    configs = {name: _write(tmp_path, _every_piece(tmp_path, toy_work, pretraining_work, family, tiny_clip,
                                                   blip2[0], name), name) for name in ("ref", "resumed")}
    result = train(configs["ref"])
    pre_steps = result.history[1]["global_step"]
    mid = _stop_at(configs["resumed"], pre_steps + 3, monkeypatch)  # in the LoRA stage, on the staged set
    assert mid["adapters"] is not None and mid["adapters"]["stage"] == 1
    if family == "open_clip":
        assert "transformer.resblocks.1.attn" in mid["adapters"]["layout"]["targets"]  # MultiheadAttention
    train(configs["resumed"])
    _assert_same_run(tmp_path / "resumed", tmp_path / "ref")
    exported = export_checkpoint(result.best, tmp_path / "export")
    _served_equals_trained(result, exported, toy_work, tmp_path)


def test_the_text_map_can_fit_on_a_seeded_sample_of_the_prompts(toy_work, pretraining_work):
    from kaggle_i2p.train.data import load_training_data
    from kaggle_i2p.train.text_map import training_prompts

    main = load_training_data(toy_work, 0)
    other = load_training_data(pretraining_work, 0, validation_prompts=set(main.prompts(main.val_rows)))
    everything = training_prompts([main, other, main], seed=0, max_prompts=None)  # each dataset once
    assert [len(rows) for _, rows in everything] == [main.n_train_prompts, other.n_train_prompts]
    sample = training_prompts([main, other], seed=0, max_prompts=20)
    assert sum(len(rows) for _, rows in sample) == 20
    assert all(set(rows) <= set(full) for (_, rows), (_, full) in zip(sample, everything, strict=True))
    again = training_prompts([main, other], seed=0, max_prompts=20)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(sample, again, strict=True))
