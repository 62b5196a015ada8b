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
    model.save_pretrained(str(folder))
    return folder, model


def test_blip2_query_tower_trains_from_a_whole_saved_model_and_its_export_serves_as_trained(
        blip2, toy_work, tmp_path):
    folder, model = blip2
    tower_entry = {"name": "blip2_q", "library": "transformers", "arch": str(folder), "features": "query_mean",
                   "init": str(folder / "model.safetensors"), "head": {"type": "linear"}, "image": IMAGE}
    config = toy_training_config(toy_work, tmp_path / "run", eval_at_start=False, tower=tower_entry,
                                 data={"val_fold": 0, "batch_size": 16, "num_workers": 0},
                                 stages=[{"name": "ft", "epochs": 1, "resolution": 64, "freeze_lowest": 1}])
    path = _write(tmp_path, config)
    spec = load_train_config(path).tower

    tower = build_tower(spec)  # the image side of the whole file: vision model, query tokens, Q-Former
    notes = load_initial_weights(tower, folder / "model.safetensors")
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


def _stopped_then_resumed(path: Path, stop_at_step: int, monkeypatch) -> None:
    """Train until the checkpoint at `stop_at_step` (as if killed there), then rerun the same config to resume."""
    from kaggle_i2p.train import trainer as trainer_module

    save = trainer_module.Trainer._save

    def save_then_stop(self, name, optimizer=None, stage=None):
        save(self, name, optimizer, stage)
        if name == trainer_module.LAST and optimizer is not None and self.progress.global_step == stop_at_step:
            raise Stop

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "_save", save_then_stop)
        with pytest.raises(Stop):
            train(path)
    assert read_checkpoint(Path(yaml.safe_load(path.read_text())["output"]) / "last.pt")["progress"][
        "global_step"] == stop_at_step
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
