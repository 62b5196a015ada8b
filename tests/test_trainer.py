"""The trainer on a toy dataset (the 7 real sample images with their true targets + synthetic colour images): it
learns, LP-FT and freezing touch only what they should, LLRD and EMA are what the config says, a killed run resumes
into the same run, 2 processes under `accelerate launch` equal 1 process with their combined batch, and the export
predicts what the trainer evaluated."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from kaggle_i2p.cli import main
from kaggle_i2p.inference.images import decode_image, make_view
from kaggle_i2p.inference.predict import run_prediction
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.towers import at_resolution, build_tower, load_initial_weights
from kaggle_i2p.testing import TINY_OPEN_CLIP_CONFIG, build_toy_training_set, toy_training_config
from kaggle_i2p.train.checkpoint import CheckpointError, read_checkpoint
from kaggle_i2p.train.config import TrainConfigError, load_train_config, parse_train_config
from kaggle_i2p.train.data import TrainImages, epoch_rows, load_training_data, rank_batches
from kaggle_i2p.train.export import export_checkpoint
from kaggle_i2p.train.trainer import Trainer, TrainingError, check_stage_architectures, train

ROOT = Path(__file__).resolve().parents[1]
UNSTABLE = ("seconds", "images_per_s")  # wall-clock fields of the history


@pytest.fixture(scope="module")
def toy_work(tmp_path_factory) -> Path:
    return build_toy_training_set(tmp_path_factory.mktemp("toy_work"))


def _config(tmp: Path, work: Path, name: str = "run", **overrides) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(toy_training_config(work, tmp / name, **overrides)))
    return path


@pytest.fixture(scope="module")
def base_run(toy_work, tmp_path_factory):
    """LP (head only) -> FT -> FT at a higher resolution, MLP head, EMA 0.9."""
    tmp = tmp_path_factory.mktemp("base_run")
    return train(_config(tmp, toy_work)), tmp


def _stable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in UNSTABLE} for record in history]


def test_training_learns_and_logs(base_run):
    result, _ = base_run
    history = result.history
    assert [(r["stage"], r["epoch"]) for r in history] == [("start", 0), ("lp", 1), ("ft", 1), ("ft", 2), ("ft48", 1)]
    start, final = history[0]["val_cosine"], history[-1]["val_cosine"]
    assert start < 0.2 and final > start + 0.4, history  # random head ~0; learnt ~0.65
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    assert all(r["val_images"] == 18 for r in history)
    assert max(r["val_cosine"] for r in history) == final
    assert result.best_val == pytest.approx(final, abs=1e-6)
    epochs = pd.read_csv(result.output / "metrics.csv")
    assert list(epochs["stage"]) == ["start", "lp", "ft", "ft", "ft48"]
    lines = [json.loads(line) for line in (result.output / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines if r["type"] == "epoch"] == list(epochs["stage"])
    assert [r["global_step"] for r in lines if r["type"] == "step"] == list(range(1, 21))  # 5 steps x 4 epochs
    best = np.load(result.output / "best_val_predictions.npz")
    assert len(best["ids"]) == 18 and np.allclose(np.linalg.norm(best["predictions"], axis=1), 1, atol=1e-5)


def test_checkpoint_holds_llrd_groups_ema_and_resolution(base_run):
    result, _ = base_run
    last = read_checkpoint(result.last)
    assert last["tower"]["native_resolution"] == 48 and last["tower"]["image"]["resolutions"] == [48]
    assert last["model"]["backbone.pos_embed"].shape == (1, 1 + 3 * 3, 64)  # resampled once to the 48 px grid
    # Between stages the checkpoint carries no optimizer: the next stage starts a fresh one.
    assert last["progress"]["stage"] == 3 and last.get("optimizer") is None
    # EMA (decay 0.9, warm-up) lags the raw weights.
    diffs = [float((last["ema"][k] - last["model"][k]).abs().max()) for k in last["model"]
             if last["model"][k].is_floating_point()]
    assert max(diffs) > 1e-4


def test_llrd_learning_rates_in_the_optimizer(toy_work, tmp_path):
    """Mid-stage checkpoint: every group's lr = stage lr x layer_decay ** (L + 1 - layer) x the schedule's scale."""
    config = _config(tmp_path, toy_work, stages=[{"name": "ft", "epochs": 2, "resolution": 32, "lr": 1e-3,
                                                  "layer_decay": 0.5}], eval_at_start=False)
    trainer = Trainer(load_train_config(config))
    stage = trainer.config.stages[0]
    model, optimizer = trainer._prepare_stage(stage, None)
    trainer._train_epoch(model, optimizer, stage, 0, 0, 0)
    groups = optimizer.param_groups
    layers = sorted({g["layer"] for g in groups})
    assert layers == list(range(8))  # embeddings, 6 blocks, norm + head
    scale = groups[0]["lr"] / (1e-3 * groups[0]["lr_scale"])
    for group in groups:
        assert group["lr_scale"] == pytest.approx(0.5 ** (7 - group["layer"]))
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"] * scale)
        assert group["weight_decay"] == (0.0 if any(n.endswith(("bias", "pos_embed", "cls_token")) or "norm" in n
                                                    for n in group["names"]) else 0.05)


def test_lp_trains_only_the_head_and_freeze_lowest_keeps_low_blocks(toy_work, tmp_path):
    config = toy_training_config(toy_work, tmp_path / "lp", ema={"decay": 0.0}, eval_at_start=False,
                                 stages=[{"name": "lp", "epochs": 1, "resolution": 32, "head_only": True}])
    config["tower"]["native_resolution"] = 32  # the init file's grid: nothing to resample
    spec = parse_train_config(config, tmp_path / "lp.yaml").tower
    torch.manual_seed(5)
    init = {k: v.contiguous() for k, v in build_tower(spec).backbone.state_dict().items()}
    save_file(init, str(tmp_path / "init.safetensors"))
    config["tower"]["init"] = str(tmp_path / "init.safetensors")
    (tmp_path / "lp.yaml").write_text(yaml.safe_dump(config))
    lp = read_checkpoint(train(tmp_path / "lp.yaml").last)
    assert lp["ema"] is None
    for key, value in init.items():
        assert torch.equal(lp["model"][f"backbone.{key}"], value), key
    head = [k for k in lp["model"] if k.startswith("head.") and lp["model"][k].is_floating_point()]
    torch.manual_seed(5)
    assert head and not torch.equal(lp["model"]["head.0.weight"], build_tower(spec).head.state_dict()["0.weight"])

    config.update(output=str(tmp_path / "frozen"),
                  stages=[{"name": "ft", "epochs": 1, "resolution": 32, "freeze_lowest": 2}])
    (tmp_path / "frozen.yaml").write_text(yaml.safe_dump(config))
    frozen = read_checkpoint(train(tmp_path / "frozen.yaml").last)["model"]
    for key, value in init.items():
        low = key.startswith(("cls_token", "pos_embed", "patch_embed", "blocks.0.", "blocks.1."))
        assert torch.equal(frozen[f"backbone.{key}"], value) == low, key


def _launch_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf"), PYTHONPATH=str(ROOT))
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_under_accelerate_equal_one_process_with_their_batch(toy_work, tmp_path):
    """DDP on CPU (gloo): 2 processes x batch 4 give the weights of 1 process x batch 8 (linear head: no batch
    statistics), and validation gathers every image back in order."""
    linear = {"name": "toy_trained", "library": "timm", "arch": "test_vit", "init": "none", "head": {"type": "linear"},
              "image": toy_training_config(toy_work, "x")["tower"]["image"]}
    common = {"tower": linear, "stages": [{"name": "ft", "epochs": 2, "resolution": 32}]}
    data = toy_training_config(toy_work, "x")["data"]
    two = _config(tmp_path, toy_work, "two", data={**data, "batch_size": 4}, **common)
    one = _config(tmp_path, toy_work, "one", data={**data, "batch_size": 8}, **common)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--main_process_port", str(_free_port()), "-m", "kaggle_i2p.cli", "train", "--config", str(two)]
    done = subprocess.run(accelerate, env=_launch_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best validation cosine") == 1  # only the main process reports
    subprocess.run([sys.executable, "-m", "kaggle_i2p.cli", "train", "--config", str(one)], env=_launch_env(tmp_path),
                   check=True, capture_output=True, timeout=300)
    a, b = read_checkpoint(tmp_path / "two" / "last.pt"), read_checkpoint(tmp_path / "one" / "last.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1
    for key in b["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=2e-4), key
    assert [r["val_images"] for r in a["history"]] == [18, 18, 18]
    assert [r["val_cosine"] for r in a["history"]] == pytest.approx([r["val_cosine"] for r in b["history"]], abs=1e-4)


def test_killed_run_resumes_into_the_same_run(toy_work, tmp_path):
    """SIGKILL mid-epoch, rerun the same command: weights, EMA, optimizer state and history equal an uninterrupted
    run's, and the metrics log has no duplicated steps."""
    overrides = {"checkpoint_every": 1, "log_every": 1,
                 "stages": [{"name": "lp", "epochs": 1, "resolution": 32, "head_only": True, "lr": 1e-2},
                            {"name": "ft", "epochs": 3, "resolution": 32}]}
    killed, reference = _config(tmp_path, toy_work, "killed", **overrides), _config(tmp_path, toy_work, "ref",
                                                                                     **overrides)
    env = _launch_env(tmp_path)
    command = [sys.executable, "-m", "kaggle_i2p.cli", "train", "--config"]
    subprocess.run([*command, str(reference)], env=env, check=True, capture_output=True, timeout=300)

    process = subprocess.Popen([*command, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and sum('"type": "step"' in line for line in metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = read_checkpoint(tmp_path / "killed" / "last.pt")
    assert 0 < state["progress"]["global_step"] < 20, "the kill should land mid-run"

    subprocess.run([*command, str(killed)], env=env, check=True, capture_output=True, timeout=300)
    a, b = read_checkpoint(tmp_path / "killed" / "last.pt"), read_checkpoint(tmp_path / "ref" / "last.pt")
    for part in ("model", "ema"):
        for key in b[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert _stable(a["history"]) == _stable(b["history"])
    steps = [json.loads(line)["global_step"] for line in metrics.read_text().splitlines()
             if '"type": "step"' in line]
    assert steps == list(range(1, 21))


def test_export_round_trip_matches_the_trainers_evaluation(base_run, tmp_path):
    result, _ = base_run
    exported = export_checkpoint(result.best, tmp_path / "export")
    weights = load_file(str(exported.weights))
    assert exported.used_ema and all(v.dtype == torch.float16 for k, v in weights.items()
                                     if not k.endswith("num_batches_tracked"))
    manifest = load_manifest(exported.manifest)
    spec = manifest.towers[0]
    assert (spec.name, spec.native_resolution, spec.image.resolutions, spec.sha256) == (
        "toy_trained", 48, (48,), exported.sha256)
    assert yaml.safe_load(exported.entry.read_text())["sha256"] == exported.sha256

    trained = np.load(result.output / "best_val_predictions.npz")
    work = Path(read_checkpoint(result.best)["config"]["work"])
    images = tmp_path / "val_images"
    images.mkdir()
    for image_id in trained["ids"]:
        (images / f"{image_id}.png").write_bytes((work / "images" / f"{image_id}.png").read_bytes())
    run = run_prediction(images, manifest, device="cpu", progress=False)
    assert list(run.ids) == list(trained["ids"])
    cosines = np.sum(run.embeddings * trained["predictions"], axis=1)
    assert cosines.min() >= 0.9999, cosines



def test_open_clip_tower_from_a_full_clip_checkpoint_at_a_raised_resolution(toy_work, tmp_path):
    """init = a whole open_clip CLIP checkpoint (visual.* + text tower): the visual part loads; training at 64
    then 80 resamples the position embeddings once; the export serves at 80 and predicts what the trainer saw."""
    import open_clip

    config_json = tmp_path / "tiny_clip.json"
    config_json.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    torch.manual_seed(1)
    clip = open_clip.CLIP(**{k: v for k, v in TINY_OPEN_CLIP_CONFIG.items()})
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "clip.pt")
    config = toy_training_config(
        toy_work, tmp_path / "clip_run", eval_at_start=False,
        tower={"name": "tiny_clip", "library": "open_clip", "arch": str(config_json), "init": str(tmp_path / "clip.pt"),
               "head": {"type": "linear"},
               "image": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "interpolation": "bilinear",
                         "resize": "shorter_side_center_crop"}},
        stages=[{"name": "a", "epochs": 1, "resolution": 64}, {"name": "b", "epochs": 1, "resolution": 80}])
    path = tmp_path / "clip.yaml"
    path.write_text(yaml.safe_dump(config))
    spec = load_train_config(path).tower
    tower = build_tower(spec)
    notes = load_initial_weights(tower, tmp_path / "clip.pt")
    assert "visual tower" in notes[0]
    assert torch.equal(tower.backbone.conv1.weight, clip.visual.conv1.weight)

    result = train(path)
    last = read_checkpoint(result.last)
    assert last["model"]["backbone.positional_embedding"].shape == (1 + 5 * 5, 64)
    exported = export_checkpoint(result.best, tmp_path / "export", name="clip80")
    assert (tmp_path / "export" / "tiny_clip.json").is_file()  # the model config travels with the weights
    manifest = load_manifest(exported.manifest)
    assert manifest.towers[0].native_resolution == 80 and manifest.towers[0].name == "clip80"
    trained = np.load(result.output / "best_val_predictions.npz")
    images = tmp_path / "val"
    images.mkdir()
    for image_id in trained["ids"]:
        (images / f"{image_id}.png").write_bytes((toy_work / "images" / f"{image_id}.png").read_bytes())
    run = run_prediction(images, manifest, device="cpu", progress=False)
    assert np.sum(run.embeddings * trained["predictions"], axis=1).min() >= 0.9999


@pytest.mark.parametrize("tower_name,size", [("toy_timm_vit", 96), ("toy_open_clip_vit", 80)])
def test_at_resolution_equals_running_the_old_tower_at_that_size(toy_manifest, tower_name, size):
    """Rebuilding at a size (resampled once) computes what the tower computes at that size on the fly."""
    spec = {s.name: s for s in load_manifest(toy_manifest).towers}[tower_name]
    torch.manual_seed(0)
    tower = build_tower(spec).eval()
    rebuilt = at_resolution(tower, size)
    assert rebuilt.spec.native_resolution == size and rebuilt is not tower and tower.spec is spec
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(images), tower(images), atol=1e-5)
    assert at_resolution(rebuilt, size) is rebuilt


def test_epoch_rows_take_one_image_per_prompt_and_rank_batches_partition_them(toy_work):
    data = load_training_data(toy_work, val_fold=0)
    index = pd.read_parquet(toy_work / "index.parquet")
    assert data.n_train_prompts == index.loc[index["fold"] != 0, "prompt"].nunique() == 41
    first, again, other = epoch_rows(data, 0, 0), epoch_rows(data, 0, 0), epoch_rows(data, 0, 1)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    prompts = index["prompt"].to_numpy()
    assert len(set(prompts[first])) == len(first) == 41  # each training prompt exactly once
    assert not set(first) & set(data.val_rows)
    pair = set(np.flatnonzero(index["prompt"].to_numpy() == "toy prompt 3").tolist())  # 2 images, training fold
    assert len(pair) == 2
    picks = {tuple(sorted(set(epoch_rows(data, 0, e).tolist()) & pair)) for e in range(20)}
    assert picks == {(min(pair),), (max(pair),)}
    two = [rank_batches(first, 4, 2, r) for r in (0, 1)]
    one = rank_batches(first, 8, 1, 0)
    assert len(one) == 5 and [a + b for a, b in zip(*two, strict=True)] == one


def test_training_views_are_inference_views_plus_seeded_augmentation(toy_work):
    data = load_training_data(toy_work, val_fold=0)
    spec = load_train_config_dict(toy_work).tower.image
    row = int(data.val_rows[0])
    plain = TrainImages(data, spec, 32)[row][0]
    expected = make_view(decode_image(data.path(row)).unsqueeze(0), spec, 32)[0]
    assert torch.equal(plain, expected)  # no augmentation: exactly what inference computes
    augment = parse_train_config(toy_training_config(toy_work, "out", data={
        "crop_scale": [0.5, 0.9], "color_jitter": 0.3}), toy_work / "c.yaml").data
    a = TrainImages(data, spec, 32, augment, seed=0, epoch=3)[row][0]
    assert torch.equal(a, TrainImages(data, spec, 32, augment, seed=0, epoch=3)[row][0])
    assert not torch.equal(a, TrainImages(data, spec, 32, augment, seed=0, epoch=4)[row][0])
    assert not torch.equal(a, expected)


def load_train_config_dict(work: Path):
    return parse_train_config(toy_training_config(work, "out"), work / "c.yaml")


def test_a_bad_image_is_skipped_not_fatal(toy_work, tmp_path, caplog):
    work = tmp_path / "work"
    build_toy_training_set(work)
    index = pd.read_parquet(work / "index.parquet")
    train_id = index.loc[index["fold"] != 0, "imgId"].iloc[3]
    val_id = index.loc[index["fold"] == 0, "imgId"].iloc[2]
    (work / "images" / f"{train_id}.png").write_bytes(b"not a png")
    (work / "images" / f"{val_id}.png").unlink()
    config = _config(tmp_path, work, stages=[{"name": "ft", "epochs": 2, "resolution": 32}])
    with caplog.at_level(logging.WARNING):
        result = train(config)
    assert any(train_id in r.getMessage() for r in caplog.records)
    assert [r["val_images"] for r in result.history] == [17, 17, 17]  # the missing one is left out
    assert result.history[-1]["val_cosine"] > result.history[0]["val_cosine"]


def test_config_errors_are_listed_together(toy_work, tmp_path):
    config = toy_training_config(toy_work, tmp_path / "o", optim={"lr": -1, "accumulation": 0}, colour=1,
                                 precision="fp8")
    config["tower"].update(init="missing.safetensors", checkpoint="x.safetensors", head={"type": "mlp"})
    config["stages"].append({"epochs": 0, "resolution": 20, "head_onyl": True})
    with pytest.raises(TrainConfigError) as err:
        parse_train_config(config, tmp_path / "bad.yaml")
    text = str(err.value)
    for expected in ("colour: unknown top-level key", "tower.init: file not found", "tower.checkpoint: is written by",
                     "tower.head.hidden", "stages[3].epochs", "stages[3].resolution", "stages[3].head_onyl",
                     "optim.lr: -1", "optim.accumulation", "precision: 'fp8'"):
        assert expected in text, expected


def test_resume_refuses_another_config_but_allows_appending_a_stage(toy_work, tmp_path):
    stages = [{"name": "ft", "epochs": 1, "resolution": 32}]
    path = _config(tmp_path, toy_work, stages=stages)
    first = train(path)
    assert [r["stage"] for r in first.history] == ["start", "ft"]
    path.write_text(yaml.safe_dump(toy_training_config(toy_work, tmp_path / "run", stages=stages,
                                                       loss={"mse_weight": 0.1})))
    with pytest.raises(TrainingError, match=r"loss.mse_weight: None -> 0.1[\s\S]*--restart"):
        train(path)
    more = [*stages, {"name": "ft48", "epochs": 1, "resolution": 48}]
    path.write_text(yaml.safe_dump(toy_training_config(toy_work, tmp_path / "run", stages=more)))
    second = train(path)
    assert [r["stage"] for r in second.history] == ["start", "ft", "ft48"]
    assert _stable(second.history[:2]) == _stable(first.history)
    assert train(path).history == second.history  # finished: nothing left to do


def test_cli_train_and_export(toy_work, tmp_path, capsys):
    path = _config(tmp_path, toy_work, stages=[{"name": "ft", "epochs": 1, "resolution": 32}])
    assert main(["train", "--config", str(path)]) == 0
    assert "best validation cosine" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "exp"),
                 "--resolutions", "32", "48", "--hflip"]) == 0
    spec = load_manifest(tmp_path / "exp" / "weights_manifest.yaml").towers[0]
    assert spec.image.resolutions == (32, 48) and spec.image.hflip
    assert main(["export", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "exp")]) == 0  # ours: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "weights_manifest.yaml").write_text("my ensemble")
    assert main(["export", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "mine")]) == 2
    assert "that `kaggle-i2p export` did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "weights_manifest.yaml").read_text() == "my ensemble"
    assert main(["export", str(path), "--out", str(tmp_path / "exp2")]) == 2
    assert "cannot read it as a checkpoint" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    assert main(["export", str(tmp_path / "other.pt"), "--out", str(tmp_path / "exp2")]) == 2
    assert "not a kaggle_i2p training checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "nowhere.pt")


def test_a_tower_of_another_width_exports_with_its_own_fallback(toy_work, tmp_path, capsys, sample_images):
    """Targets of another embedding model (16-d here): the export refuses the package's 384-d fallback before writing
    anything and names the fix; with --fallback the manifest validates and predicts 16-d rows."""
    import shutil

    work = tmp_path / "work16"
    shutil.copytree(toy_work, work)
    rows = len(np.load(work / "targets.npy", mmap_mode="r"))
    np.save(work / "targets.npy", np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float16))
    path = _config(tmp_path, work, stages=[{"name": "ft", "epochs": 1, "resolution": 32}])
    assert main(["train", "--config", str(path)]) == 0
    best = str(tmp_path / "run" / "best.pt")
    assert main(["export", best, "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "predicts 16-d targets and the package's fallback vector is 384-d" in err and "--fallback FILE" in err
    assert not (tmp_path / "exp").exists()
    np.save(tmp_path / "wrong.npy", np.ones(384, dtype=np.float32))
    assert main(["export", best, "--out", str(tmp_path / "exp"), "--fallback", str(tmp_path / "wrong.npy")]) == 2
    assert "--fallback" in capsys.readouterr().err and not (tmp_path / "exp").exists()
    mean = np.load(work / "targets.npy").astype(np.float64).mean(axis=0)
    np.save(tmp_path / "mean16.npy", mean)
    assert main(["export", best, "--out", str(tmp_path / "exp"), "--fallback", str(tmp_path / "mean16.npy")]) == 0
    manifest = load_manifest(tmp_path / "exp" / "weights_manifest.yaml")
    assert manifest.embedding_dim == 16 and manifest.fallback_path.name == "mean16.npy"
    np.testing.assert_allclose(manifest.fallback, mean / np.linalg.norm(mean), atol=1e-6)
    run = run_prediction(sample_images, manifest, device="cpu", num_workers=0, progress=False)
    assert run.embeddings.shape == (len(run.ids), 16) and np.isfinite(run.embeddings).all()


def test_gradient_accumulation_equals_the_larger_batch(toy_work, tmp_path):
    """2 micro-batches of 4 per step = 1 batch of 8 (linear head, so no batch statistics)."""
    data = toy_training_config(toy_work, "x")["data"]
    tower = {**toy_training_config(toy_work, "x")["tower"], "head": {"type": "linear"}}
    stages = [{"name": "ft", "epochs": 1, "resolution": 32}]
    accumulated = train(_config(tmp_path, toy_work, "acc", tower=tower, stages=stages, eval_at_start=False,
                                data={**data, "batch_size": 4},
                                optim={**toy_training_config(toy_work, "x")["optim"], "accumulation": 2}))
    single = train(_config(tmp_path, toy_work, "single", tower=tower, stages=stages, eval_at_start=False,
                           data={**data, "batch_size": 8}))
    a, b = read_checkpoint(accumulated.last)["model"], read_checkpoint(single.last)["model"]
    assert read_checkpoint(accumulated.last)["progress"]["global_step"] == 5
    for key in b:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_precision_choice_and_a_bf16_run(toy_work, tmp_path, monkeypatch):
    from kaggle_i2p.train import trainer

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert [trainer.mixed_precision(p, True) for p in ("auto", "fp32", "fp16", "bf16")] == ["fp16", "no", "fp16",
                                                                                            "bf16"]
    assert trainer.mixed_precision("auto", False) == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert trainer.mixed_precision("auto", True) == "bf16"
    # bf16 autocast (on the CPU here; fp16 + grad scaler needs a GPU) in its own process: accelerate fixes the
    # precision once per process.
    config = _config(tmp_path, toy_work, "bf16", precision="bf16",
                     stages=[{"name": "ft", "epochs": 2, "resolution": 32}])
    subprocess.run([sys.executable, "-m", "kaggle_i2p.cli", "train", "--config", str(config)],
                   env=_launch_env(tmp_path), check=True, capture_output=True, timeout=300)
    history = read_checkpoint(tmp_path / "bf16" / "last.pt")["history"]
    assert history[-1]["val_cosine"] > history[0]["val_cosine"] + 0.15


@pytest.mark.parametrize("config_name", ["train_vit_l_14_336", "train_eva02_l_336", "train_convnext_xxl"])
def test_shipped_configs_train_the_reference_manifest_towers(config_name, tmp_path, monkeypatch):
    """configs/*.yaml validate, every stage resolution runs on the meta device, and the tower each trains is the
    reference weights_manifest.yaml's entry (same arch, head and preprocessing), so an export drops into it."""
    for variable in ("VIT_L_14_336_WEIGHTS", "EVA02_L_336_WEIGHTS", "CONVNEXT_XXL_WEIGHTS"):
        (tmp_path / variable).write_bytes(b"")
        monkeypatch.setenv(variable, str(tmp_path / variable))
    config = load_train_config(ROOT / "configs" / f"{config_name}.yaml", check_files=False)
    reference = {t.name: t for t in load_manifest(ROOT / "weights_manifest.yaml", check_files=False).towers}
    expected = reference[config.tower.name]
    for field in ("library", "arch", "head", "image", "native_resolution"):
        assert getattr(config.tower, field) == getattr(expected, field), field
    check_stage_architectures(config)  # raises ManifestError on a resolution the arch cannot run at


def test_a_stage_resolution_off_the_patch_grid_is_refused_before_training(toy_work, tmp_path):
    from kaggle_i2p.manifest import ManifestError

    config = _config(tmp_path, toy_work, stages=[{"name": "ft", "epochs": 1, "resolution": 40}])
    with pytest.raises(ManifestError, match="40 is not a multiple of the patch size 16"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_a_skipped_fp16_step_leaves_the_ema_alone(toy_work, tmp_path, monkeypatch):
    """fp16's grad scaler skips steps whose gradients overflow (accelerate: step_was_skipped); those must not move
    the EMA. (accelerate's fp16 needs a GPU; here every step reports skipped.)"""
    from accelerate.optimizer import AcceleratedOptimizer

    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: True))
    config = toy_training_config(toy_work, tmp_path / "run", eval_at_start=False,
                                 stages=[{"name": "ft", "epochs": 1, "resolution": 32}])
    config["tower"].update(head={"type": "linear"}, native_resolution=32)  # no batch statistics, no resampling
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    initial = build_tower(load_train_config(path).tower).state_dict()
    last = read_checkpoint(train(path).last)
    for key, value in initial.items():
        assert torch.equal(last["ema"][key], value), key
    assert not torch.equal(last["model"]["head.weight"], initial["head.weight"])


def test_missing_accelerate_is_one_clear_error(toy_work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed
    with pytest.raises(TrainingError, match=r"pip install 'kaggle_i2p\[train\]'"):
        train(_config(tmp_path, toy_work))


def test_optimizers_by_name_from_timm_keep_the_layer_decayed_groups(toy_work, tmp_path, monkeypatch):
    """optim.optimizer (and a stage's own, as the 5th place's MADGRAD then another for the last stage): timm's
    optimizer over our groups, every group's lr kept; an unknown name is a config error naming the field."""
    from kaggle_i2p.train import recipe, trainer

    built = []
    real = recipe.make_optimizer

    def recording(groups, name, lr, betas):
        optimizer = real(groups, name, lr, betas)
        built.append((type(optimizer).__name__, [g["lr"] for g in optimizer.param_groups], [g["lr"] for g in groups]))
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", recording)
    stages = [{"name": "ft", "epochs": 2, "resolution": 32, "lr": 1e-2},
              {"name": "last", "epochs": 1, "resolution": 32, "optimizer": "lamb", "lr": 1e-3}]
    result = train(_config(tmp_path, toy_work, optim={"optimizer": "madgrad", "layer_decay": 0.8}, stages=stages))
    assert [name for name, *_ in built] == ["MADGRAD", "Lamb"]
    assert all(got == pytest.approx(want) and len(set(want)) > 2 for _, got, want in built)  # LLRD: many lrs
    history = result.history
    assert history[-1]["val_cosine"] > history[0]["val_cosine"] + 0.15  # it trains (random init, no LP stage)
    with pytest.raises(TrainConfigError, match=r"stages\[0\]\.optimizer: 'adamx' is not an optimizer timm knows"):
        parse_train_config(toy_training_config(toy_work, tmp_path / "o", stages=[
            {"epochs": 1, "resolution": 32, "optimizer": "adamx"}]), tmp_path / "c.yaml")
