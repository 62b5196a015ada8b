"""Evaluation and weight tuning: synthetic towers of known quality, exactness against the inference formula,
out-of-fold honesty, and tuned manifests that load and predict what the tuner measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.ensemble import l2_normalize, mean_cosine
from kaggle_i2p.inference.predict import PredictionRun, RunSummary
from kaggle_i2p.manifest import ManifestError, load_manifest
from kaggle_i2p.tuning.evaluate import (
    TargetError,
    evaluate_run,
    fold_numbers,
    load_targets,
    tune_run,
    view_predictions,
    write_tuned_manifest,
)
from kaggle_i2p.tuning.tune import _groups_of, _torch_score, apply_weights, tune_dim_weights, tune_weights

RNG_SEED = 7


def synthetic(n: int = 600, dim: int = 384):
    """Target plus noise of known sizes: 'good' < 'fair' < 'poor' noise, and 'useless' pure noise."""
    rng = np.random.default_rng(RNG_SEED)
    target = l2_normalize(rng.standard_normal((n, dim)))
    noise = {"good": 0.03, "fair": 0.06, "poor": 0.12}
    preds = {k: l2_normalize(target + s * rng.standard_normal((n, dim))) for k, s in noise.items()}
    preds["useless"] = l2_normalize(rng.standard_normal((n, dim)))
    return preds, target


def _fake_run(preds: dict[str, np.ndarray]) -> PredictionRun:
    ids = [f"img{i:04d}" for i in range(len(next(iter(preds.values()))))]
    views = {k: {"r224": v} for k, v in preds.items()}
    return PredictionRun(ids, apply_weights(preds, dict.fromkeys(preds, 1.0)), dict(preds), views,
                         RunSummary(n_images=len(ids), towers=list(preds), n_views=len(preds), device="cpu"))


def test_tuned_weights_rank_towers_by_quality_and_ignore_the_useless_one():
    preds, target = synthetic()
    weights = tune_weights(preds, target)
    assert weights["good"] > weights["fair"] > weights["poor"] > weights["useless"]
    assert weights["useless"] < 0.01
    assert sum(weights.values()) == pytest.approx(1.0) and min(weights.values()) >= 0
    assert tune_weights(preds, target) == weights  # deterministic
    tuned = mean_cosine(apply_weights(preds, weights), target)[0]
    equal = mean_cosine(apply_weights(preds, dict.fromkeys(preds, 1.0)), target)[0]
    assert tuned > equal


@pytest.mark.parametrize("mode", ["per_tower", "per_view", "per_dim"])
def test_tuner_objective_is_the_inference_formula(mode):
    preds, target = synthetic(n=50)
    rng = np.random.default_rng(1)
    groups = {"good": "a", "fair": "a", "poor": "b", "useless": "b"} if mode == "per_view" else None
    shape = (4, 384) if mode == "per_dim" else (4,)
    raw = rng.uniform(0.1, 1.0, shape)
    weights = dict(zip(preds, raw, strict=True))
    stack = torch.from_numpy(np.stack(list(preds.values())).astype(np.float64))
    ours = _torch_score(stack, torch.from_numpy(target.astype(np.float64)), torch.from_numpy(raw),
                        _groups_of(list(preds), groups))
    inference = mean_cosine(apply_weights(preds, weights, groups), target)[0]
    assert float(ours) == pytest.approx(inference, abs=1e-6)


def test_out_of_fold_tuned_beats_equal_beats_worst_single():
    preds, target = synthetic()
    manifest = _manifest_stub(preds)
    run = _fake_run(preds)
    folds = fold_numbers(run.ids, 5)
    report, fitted = tune_run(run, manifest, target, folds)
    worst = min(mean_cosine(p, target)[0] for p in preds.values())
    assert report.oof["tuned"] >= report.oof["equal_weights"] >= worst
    assert report.oof["tuned"] > report.oof["best_single_tower"] - 1e-3
    assert report.n_folds == 5 and set(report.weights) == set(preds)
    assert report.weights == fitted


def test_per_dim_weights_stay_near_the_per_tower_solution():
    preds, target = synthetic(n=300)
    scalar = tune_weights(preds, target)
    per_dim = tune_dim_weights(preds, target, dim_regularization=10.0)
    for name, vector in per_dim.items():
        assert vector.shape == (384,) and (vector >= 0).all()
        assert float(vector.mean()) == pytest.approx(scalar[name], abs=0.03)
    assert mean_cosine(apply_weights(preds, per_dim), target)[0] >= mean_cosine(apply_weights(preds, scalar),
                                                                                target)[0] - 1e-4


def _manifest_stub(preds):
    class Stub:
        towers = [type("T", (), {"name": k, "weight": 1.0})() for k in preds]
        fallback = np.ones(384, np.float32) / np.sqrt(384)

    return Stub()


@pytest.mark.parametrize("mode", ["per_tower", "per_view", "per_dim"])
def test_tuned_manifest_loads_and_predicts_what_was_tuned(mode, sample_images, toy_manifest, tmp_path, sample_dir):
    options = {"device": "cpu", "num_workers": 0, "progress": False, "include_zero_weight": True}
    manifest = load_manifest(toy_manifest)
    run = kaggle_i2p.run_prediction(sample_images, manifest, **options)
    targets = load_targets(run.ids, prompts_csv=sample_dir / "prompts.csv")
    folds = fold_numbers(run.ids, 3)
    report, fitted = tune_run(run, manifest, targets, folds, per_view=mode == "per_view", per_dim=mode == "per_dim")
    out = write_tuned_manifest(toy_manifest, tmp_path / "elsewhere" / "tuned.yaml", report, fitted)

    tuned = load_manifest(out)  # relative paths were rebased to the new folder
    for new, old in zip(tuned.towers, manifest.towers, strict=True):
        assert new.checkpoint.resolve() == old.checkpoint.resolve()
    predicted = kaggle_i2p.run_prediction(sample_images, tuned, **options).embeddings
    if mode == "per_view":
        preds, groups = view_predictions(run, manifest.fallback)
        expected = apply_weights(preds, fitted, groups)
        assert tuned.towers[0].image.view_weights is not None
    else:
        expected = apply_weights(run.tower_embeddings, fitted)
        if mode == "per_dim":
            assert tuned.towers[0].dim_weights.shape == (384,)
    np.testing.assert_allclose(predicted, expected, atol=2e-6)
    assert mean_cosine(predicted, targets)[0] == pytest.approx(report.fit_all_score, abs=1e-5)


def test_evaluate_report_matches_hand_scores(sample_images, toy_manifest, sample_dir):
    manifest = load_manifest(toy_manifest)
    run = kaggle_i2p.run_prediction(sample_images, manifest, device="cpu", num_workers=0, progress=False,
                                    include_zero_weight=True)
    targets = load_targets(run.ids, prompts_csv=sample_dir / "prompts.csv")
    report = evaluate_run(run, manifest, targets)
    assert report.n_images == 7
    assert report.ensemble == pytest.approx(np.mean(np.sum(run.embeddings * targets, axis=1)), abs=1e-6)
    for name, tower in run.tower_embeddings.items():
        assert report.per_tower[name] == pytest.approx(np.mean(np.sum(tower * targets, axis=1)), abs=1e-6)
    raw = run.view_outputs["toy_timm_vit"]["r96_flip"]
    assert report.per_view["toy_timm_vit/r96_flip"] == pytest.approx(
        np.mean(np.sum(l2_normalize(raw) * targets, axis=1)), abs=1e-6)
    assert set(report.per_view) == {"toy_timm_vit/r64", "toy_timm_vit/r64_flip", "toy_timm_vit/r96",
                                    "toy_timm_vit/r96_flip", "toy_open_clip_vit/r64", "toy_open_clip_vit/r80"}
    assert report.best_single == {max(report.per_tower, key=report.per_tower.get): max(report.per_tower.values())}


def test_cli_evaluate_and_tune(sample_images, toy_manifest, sample_dir, tmp_path, capsys):
    common = ["--manifest", str(toy_manifest), "--device", "cpu", "--workers", "0", "--json",
              "--cache-dir", str(tmp_path / "cache")]
    assert main(["evaluate", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"n_images", "ensemble", "equal_weights", "per_tower", "per_view", "best_single"} <= set(report)

    targets = load_targets(sorted(p.stem for p in sample_images.iterdir()), prompts_csv=sample_dir / "prompts.csv")
    np.save(tmp_path / "targets.npy", targets)
    out = tmp_path / "tuned.yaml"
    assert main(["tune", str(sample_images), "--targets", str(tmp_path / "targets.npy"), "--out", str(out),
                 "--folds", "3", *common]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert set(tuned["oof"]) == {"tuned", "equal_weights", "manifest_weights", "best_single_tower"}
    written = yaml.safe_load(out.read_text())
    assert [t["weight"] for t in written["towers"]] == pytest.approx(list(tuned["weights"].values()), abs=1e-7)
    assert written["towers"][0]["image"]["mean"] == [0.485, 0.456, 0.406]  # everything else unchanged


def test_targets_errors(tmp_path, sample_dir):
    ids = ["20057f34d", "nope"]
    with pytest.raises(TargetError, match="no prompt for 1 image"):
        load_targets(ids, prompts_csv=sample_dir / "prompts.csv")
    np.save(tmp_path / "t.npy", np.ones((3, 384)))
    with pytest.raises(TargetError, match=r"has shape \(3, 384\); expected \(2, D\)"):
        load_targets(ids, targets_npy=tmp_path / "t.npy")
    with pytest.raises(TargetError, match="exactly one of"):
        load_targets(ids)


def test_fold_column_is_used(tmp_path):
    (tmp_path / "p.csv").write_text("imgId,prompt,fold\na,x,1\nb,y,0\nc,z,1\n")
    assert fold_numbers(["a", "b", "c"], 5, prompts_csv=tmp_path / "p.csv").tolist() == [1, 0, 1]


def test_manifest_checks_view_and_dim_weights(tmp_path, toy_manifest):
    data = yaml.safe_load(toy_manifest.read_text())
    folder = toy_manifest.parent
    for tower in data["towers"]:
        tower["checkpoint"] = str(folder / tower["checkpoint"])
    data["towers"][1]["arch"] = str(folder / data["towers"][1]["arch"])
    data["fallback"] = str(folder / data["fallback"])
    data["towers"][0]["image"]["view_weights"] = {"r64": 1, "r128": 1}
    np.save(tmp_path / "dw.npy", -np.ones(384))
    data["towers"][1]["dim_weights"] = str(tmp_path / "dw.npy")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "image.view_weights.r128: is not a view of this tower; its views are r64, r64_flip, r96, r96_flip" in message
    assert "image.view_weights.r96: needs a weight >= 0 for every view" in message
    assert "dim_weights: " in message and "must hold 384 finite weights >= 0" in message
