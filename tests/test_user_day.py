"""Issue 34, part 5 (say what is happening): the steps that load or check towers before any bar can start say each
step on stderr (inspect, validate-manifest --deep, plan; not under --quiet, and stdout stays what it was); the demo's
first build says its measured steps; the progress bar counts towers as the summary does; building the package
prints no setuptools warning (its metadata is in pyproject.toml)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
import yaml

from kaggle_i2p.cli import main
from kaggle_i2p.core import progress
from kaggle_i2p.inference.predict import progress_label

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^kaggle_i2p \[\s*\d+\.\d s\] ")


def _steps(err: str) -> list[str]:
    return [LINE.sub("", line) for line in err.splitlines() if LINE.match(line)]


def test_validate_deep_and_plan_say_each_tower_they_load(toy_manifest, capsys):
    try:
        assert main(["validate-manifest", "--deep", str(toy_manifest)]) == 0
        captured = capsys.readouterr()
        steps = _steps(captured.err)
        assert steps[0].startswith("checking tower 'toy_timm_vit' (towers[0]): timm test_vit at [64, 96]")
        assert any(s.startswith("checking tower 'toy_open_clip_vit' (towers[1]): keys and shapes of ") and
                   re.search(r"\(\d+\.\d [KM]B\)$", s) for s in steps), steps
        assert "OK (2 towers)" in captured.out and not LINE.search(captured.out)

        assert main(["plan", "--manifest", str(toy_manifest), "--device", "cpu", "--workers", "0", "--repeats",
                     "1", "--json"]) == 0
        captured = capsys.readouterr()
        steps = _steps(captured.err)
        assert "plan: loading tower 'toy_timm_vit' (1/2) on cpu" in steps
        assert "plan: timing tower 'toy_open_clip_vit': 2 view(s), 1 batches of 8 each" in steps
        assert captured.out.lstrip().startswith("{")  # the JSON alone on stdout

        assert main(["plan", "--manifest", str(toy_manifest), "--device", "cpu", "--workers", "0", "--repeats",
                     "1", "--quiet"]) == 0
        assert _steps(capsys.readouterr().err) == []  # --quiet says nothing
    finally:
        progress.enable(False)


def test_inspect_says_what_it_reads_and_tries(tmp_path, capsys):
    torch.save(timm.create_model("convnext_atto", pretrained=False, num_classes=384).state_dict(), tmp_path / "c.pth")
    try:
        assert main(["inspect", str(tmp_path / "c.pth")]) == 0
    finally:
        progress.enable(False)
    captured = capsys.readouterr()
    steps = _steps(captured.err)
    assert steps[0] == "inspect: reading the keys and shapes of c.pth"
    assert "inspect: trying timm convnext_atto, head Linear(320 -> 384) `head.fc`" in steps
    assert yaml.safe_load(captured.out)[0]["arch"] == "convnext_atto"  # stdout is the entry alone


def test_library_calls_stay_silent(toy_manifest, capsys):
    from kaggle_i2p.models.towers import validate_manifest

    progress.enable(False)
    validate_manifest(toy_manifest, deep=True)
    assert _steps(capsys.readouterr().err) == []


def test_the_progress_bar_counts_towers_as_the_summary_does():
    assert progress_label(SimpleNamespace(active=["vit", "prior"], with_network=["vit"])) == "2 towers (1 constant)"
    assert progress_label(SimpleNamespace(active=["vit"], with_network=["vit"])) == "1 tower"


def test_the_demo_build_says_its_measured_steps(tmp_path, capsys):
    from kaggle_i2p.demo.ensemble import build_demo_ensemble

    build_demo_ensemble(tmp_path / "demo")
    err = capsys.readouterr().err
    assert "first use only; 6 s on 2 idle CPU cores" in err
    for number, what in ((1, "converting the PyPI EfficientNet-Lite0"), (2, "embedding 1000 ImageNet phrases"),
                         (3, "writing the prior and the manifest")):
        assert re.search(rf"  {number}/3 {what}[^\n]* \.\.\. \d+\.\d s\n", err), err


def test_building_the_package_prints_no_setuptools_warning(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    said = built.stdout + built.stderr
    assert not re.search(r"(SetuptoolsDeprecationWarning|BuildBackendWarning|is absent from the `packages`)", said)
    assert not (ROOT / "setup.py").exists()  # the metadata is pyproject.toml's
