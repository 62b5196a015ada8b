"""Honest numbers (issue 34, part 4): a warning wherever the numbers cannot be trusted as they are, and `plan`'s exit
status when the run does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.ensemble import view_agreement
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.tuning.evaluate import evaluate_run, load_targets, score_warnings, tune_run


@pytest.fixture(scope="module")
def toy_run(toy_manifest, sample_dir):
    run = kaggle_i2p.run_prediction(sample_dir / "images", toy_manifest, device="cpu", num_workers=0, progress=False,
                                    include_zero_weight=True)
    targets = load_targets(run.ids, prompts_csv=sample_dir / "prompts.csv", embedding_dim=384)
    return run, load_manifest(toy_manifest), targets


def test_per_dim_tuning_on_fewer_images_than_weights_says_it_cannot_generalise(toy_run):
    run, manifest, targets = toy_run
    report, _ = tune_run(run, manifest, targets, np.arange(7) % 3, per_dim=True)
    assert report.parameters == 2 * 384
    (warning,) = report.warnings
    assert "fits 768 weights on as few as 4 images per fold" in warning
    assert "generalises out of fold" not in str(report) and "cannot show" in str(report)
    tower, _ = tune_run(run, manifest, targets, np.arange(7) % 3)  # 2 weights on 4 images: nothing to say
    assert tower.parameters == 2 and tower.warnings == []


def test_an_ensemble_below_the_prior_and_views_that_disagree_are_warned(toy_run):
    run, manifest, targets = toy_run
    report = evaluate_run(run, manifest, targets)
    prior = float(np.mean(targets @ manifest.fallback))
    assert report.prior == pytest.approx(prior, abs=1e-5)
    assert set(report.view_agreement) == {"toy_timm_vit", "toy_open_clip_vit"}
    assert all(-1 <= v <= 1 for v in report.view_agreement.values())
    assert any("below the prior vector alone" in w for w in report.warnings) == (report.ensemble < prior)
    assert "warning:" in str(report) if report.warnings else True
    words = score_warnings(0.18, 0.35, {"a": 0.62, "b": 0.97})
    assert "scores 0.1800, below the prior vector alone (0.3500)" in words[0]
    assert "tower 'a': its views agree at a mean cosine of only 0.620" in words[1] and len(words) == 2


def test_view_agreement_is_the_mean_cosine_between_views():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert view_agreement([a, b]) == pytest.approx(0.5)  # the third row is left out (non-finite in one view)
    assert view_agreement([a]) is None


def test_a_dry_run_below_the_prior_says_so(toy_manifest, capsys):
    from kaggle_i2p.inference.dryrun import dry_run

    report = dry_run(None, toy_manifest, device="cpu", num_workers=0, progress=False, check_embeddings=False)
    below = report.mean_cosine < report.fallback_mean_cosine
    assert bool(report.warnings) == below
    assert json.loads(report.to_json())["warnings"] == report.warnings


def test_plan_exits_3_when_the_run_does_not_fit(toy_manifest, capsys):
    assert main(["plan", "--manifest", str(toy_manifest), "--device", "cpu", "--repeats", "1", "--workers", "0",
                 "--budget", "1s", "--images", "100000"]) == 3
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_out_writes_the_manifest_that_fits(toy_manifest, tmp_path, capsys, monkeypatch):
    """A budget only the open_clip tower's 64 px view fits: --out writes the manifest without the units the plan
    leaves out (whole resolutions and the flips), which parses and plans as fitting."""
    from kaggle_i2p.inference import plan as plan_module

    real = plan_module.RunPlan.total_s
    monkeypatch.setattr(plan_module, "parse_budget", lambda text: 1.0)  # every unit costs the same below
    monkeypatch.setattr(plan_module.RunPlan, "total_s",
                        lambda self, views=None: float(len(self.views if views is None else views)) / 2)
    out = tmp_path / "trimmed.yaml"
    commented = toy_manifest.parent / "commented_plan.yaml"  # the user's own file: its comments are kept
    commented.write_text("# my towers for the 9 h run\n" + toy_manifest.read_text().replace(
        "weight: 0.6", "weight: 0.6  # the best one"))
    assert main(["plan", "--manifest", str(commented), "--device", "cpu", "--repeats", "1", "--workers", "0",
                 "--out", str(out)]) == 3
    said = capsys.readouterr().out
    assert f"wrote {out}" in said
    written = out.read_text()
    assert written.startswith("# my towers for the 9 h run\n") and "  # the best one" in written
    trimmed = load_manifest(out)
    views = [(t.name, v.name) for t in trimmed.towers if t.weight > 0 for v in t.views]
    assert len(views) <= 2 and views  # at most 1.0 s of budget at 0.5 s a view
    monkeypatch.setattr(plan_module.RunPlan, "total_s", real)
