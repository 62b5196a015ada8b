"""The kaggle-i2p command line, called in-process (the network is blocked for every test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kaggle_i2p.cli import main
from kaggle_i2p.inference.submission import read_submission
from kaggle_i2p.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_validate_manifest_ok_and_error(toy_manifest, tmp_path, capsys):
    assert main(["validate-manifest", str(toy_manifest)]) == 0
    assert "OK (2 towers)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(toy_manifest.read_text().replace("weight: 0.6", "weight: -1"))
    assert main(["validate-manifest", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "kaggle-i2p validate-manifest: error:" in err and "towers[0]).weight: -1 is negative" in err


def test_predict_command(sample_images, toy_manifest, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    code = main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), "--device", "cpu",
                 "--workers", "0", "--batch-size", "4", "--quiet"])
    assert code == 0 and len(read_submission(out)) == 7 * 384


def test_predict_missing_folder_is_a_clean_error(toy_manifest, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing"), "--manifest", str(toy_manifest)]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_dry_run_json(toy_manifest, capsys):
    code = main(["dry-run", "--manifest", str(toy_manifest), "--json", "--device", "cpu", "--workers", "0"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["n_images"] == 7 and report["format_ok"] is True and report["format_problems"] == []
    assert set(report["per_image"]) == {"20057f34d", "227ef0887", "92e911621", "a4e1c55a9", "c98f79f71",
                                        "d8edf2e40", "f27825b2c"}
    assert report["mean_cosine"] == np.mean(list(report["per_image"].values()))
    assert -1 <= report["mean_cosine"] <= 1
    assert report["embedding_check_max_abs_diff"] <= 1e-6 and report["embedding_check_ok"] is True
    # the toy towers use the packaged prior (mean embedding of generic prompts) as fallback: ~0.35 on the sample
    assert report["fallback_mean_cosine"] == pytest.approx(0.354, abs=0.002)


def test_dry_run_scores_a_perfect_prediction_as_one(tmp_path, sample_dir, monkeypatch):
    """Feed the true targets through the pipeline's scoring: the mean cosine must be 1."""
    from kaggle_i2p.inference import dryrun
    from kaggle_i2p.inference.predict import PredictionRun, RunSummary

    ids, targets = dryrun.sample_targets(sample_dir / "sample_submission.csv")
    monkeypatch.setattr(dryrun, "run_prediction", lambda *a, **k: PredictionRun(
        ids, targets, {}, {}, RunSummary(n_images=7, towers=[], n_views=0, device="cpu")))
    manifest = load_manifest(ROOT / "weights_manifest.yaml", check_files=False)
    report = dryrun.dry_run(manifest=manifest, check_embeddings=False)
    assert report.format_ok and abs(report.mean_cosine - 1.0) < 1e-6
    # the reference fallback (mean of the generic prior prompts) scores about 0.35 on the sample
    assert report.fallback_mean_cosine == pytest.approx(0.354, abs=0.002)


def test_dry_run_format_failure_exits_nonzero(tmp_path, sample_dir, toy_manifest, capsys):
    import shutil

    sample = tmp_path / "sample"
    shutil.copytree(sample_dir, sample)
    (sample / "images" / "f27825b2c.png").unlink()  # 6 images against a 7-image sample_submission
    code = main(["dry-run", "--sample-dir", str(sample), "--manifest", str(toy_manifest), "--device", "cpu",
                 "--workers", "0", "--no-embedding-check", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "format vs sample_submission.csv: FAILED" in out and "2304 rows, expected 2688" in out


def test_help_imports_nothing_heavy():
    """`kaggle-i2p --help` (and building the parser) loads no torch, timm, open_clip or pandas."""
    import subprocess
    import sys

    code = ("import sys; from kaggle_i2p.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'timm', 'open_clip', 'pandas', 'faiss') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    for command in ("predict", "build-bank", "train", "tune"):
        shown = subprocess.run([sys.executable, "-m", "kaggle_i2p.cli", command, "--help"], capture_output=True,
                               text=True, timeout=120)
        assert shown.returncode == 0 and f"usage: kaggle-i2p {command}" in shown.stdout
