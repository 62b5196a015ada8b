"""Data-parallel encoding: one process per device, whole chunks each, the cache as the exchange; the output is the
bytes of one device, and a process that fails costs nothing but time (shown here with CPU processes)."""

from __future__ import annotations

import logging
from concurrent.futures import Future

import pytest

from kaggle_i2p.inference import parallel
from kaggle_i2p.inference.devices import resolve_devices
from kaggle_i2p.inference.predict import encode_part, predict_dir


def _predict(images, manifest, out, **options):
    predict_dir(images, manifest, out_csv=out, num_workers=0, progress=False, batch_size=2, cache_chunk_size=3,
                return_frame=False, **options)
    return out.read_bytes()


def test_two_processes_write_the_bytes_of_one(sample_images, toy_manifest, tmp_path, caplog):
    """7 images in chunks of 3: chunks 0 and 2 on the first process, chunk 1 on the second, each spawned; the
    submission equals a one-process run's byte for byte, with or without a cache folder (a temporary one is made
    and removed)."""
    caplog.set_level(logging.INFO, logger="kaggle_i2p")
    single = _predict(sample_images, toy_manifest, tmp_path / "one.csv", device="cpu")
    shared = _predict(sample_images, toy_manifest, tmp_path / "two.csv", device="cpu,cpu",
                      cache_dir=tmp_path / "cache")
    assert shared == single
    assert "encoding on 2 devices (cpu, cpu)" in caplog.text
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 3 * 6  # 3 chunks x 6 views, written by the two
    caplog.clear()
    assert _predict(sample_images, toy_manifest, tmp_path / "three.csv", device="cpu,cpu") == single
    temporary = caplog.text.split("through the cache at ")[1].split()[0]
    assert not (tmp_path / temporary).exists()


class _InProcessPool:
    """ProcessPoolExecutor's interface, run in this process; the process of share 1 fails."""

    def __init__(self, max_workers, mp_context):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, function, setup):
        future = Future()
        if setup.share[0] == 1:
            future.set_exception(RuntimeError("CUDA error: an illegal memory access was encountered"))
        else:
            future.set_result(function(setup))
        return future


def test_a_failed_process_loses_nothing_its_chunks_are_computed_after(sample_images, toy_manifest, tmp_path,
                                                                         monkeypatch, caplog):
    single = _predict(sample_images, toy_manifest, tmp_path / "one.csv", device="cpu")
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", _InProcessPool)
    shared = _predict(sample_images, toy_manifest, tmp_path / "two.csv", device="cpu,cpu",
                      cache_dir=tmp_path / "cache")
    assert shared == single
    assert "the process on cpu stopped (RuntimeError: CUDA error" in caplog.text


def test_devices_auto_takes_every_gpu_and_a_list_names_them(monkeypatch):
    import torch

    from kaggle_i2p.core.errors import OptionError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_devices("auto") == (torch.device("cuda:0"), torch.device("cuda:1"))
    assert resolve_devices("cuda:1") == (torch.device("cuda:1"),)
    assert resolve_devices("cpu, cpu") == (torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(OptionError, match="only 2 CUDA device"):
        resolve_devices("cuda:0,cuda:2")


def test_machines_sharing_a_cache_folder_split_a_run(sample_images, toy_manifest, tmp_path, monkeypatch, capsys):
    """Each "machine" encodes its part of the chunks into the shared cache and writes no CSV; the last run without
    a share loads no tower and writes the bytes of one run. The CLI's `--share R/W` does the same."""
    from kaggle_i2p.cli import main
    from kaggle_i2p.inference import predict as predict_module

    single = _predict(sample_images, toy_manifest, tmp_path / "one.csv", device="cpu")
    options = {"device": "cpu", "num_workers": 0, "batch_size": 2, "cache_chunk_size": 3, "progress": False}
    cache = tmp_path / "shared"
    assert encode_part(sample_images, toy_manifest, cache, (1, 2), **options) == 3  # chunk 1
    assert encode_part(sample_images, toy_manifest, cache, (0, 2), **options) == 4  # chunks 0 and 2
    with monkeypatch.context() as patch:
        patch.setattr(predict_module, "load_tower", lambda *a, **k: pytest.fail("a tower was loaded"))
        assert _predict(sample_images, toy_manifest, tmp_path / "all.csv", device="cpu", cache_dir=cache) == single

    common = [str(sample_images), "--manifest", str(toy_manifest), "--device", "cpu", "--workers", "0", "--quiet",
              "--out", str(tmp_path / "never.csv")]
    assert main(["predict", *common, "--cache-dir", str(tmp_path / "cli"), "--share", "1/2"]) == 0
    assert "part 1 of 2: 0 images encoded" in capsys.readouterr().out  # 7 images: one chunk, part 0's
    assert not (tmp_path / "never.csv").exists()
    assert main(["predict", *common, "--share", "0/2"]) == 2  # no --cache-dir
    assert "--share needs --cache-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", *common, "--share", "2/2"])
    assert "give R/W" in capsys.readouterr().err


def test_devices_without_a_usable_cache_run_on_the_first_alone(sample_images, toy_manifest, tmp_path, caplog):
    """A cache folder that cannot be made is a warning (an optional helper): the devices cannot exchange chunks, so
    the run goes on on the first device alone, with the same bytes."""
    single = _predict(sample_images, toy_manifest, tmp_path / "one.csv", device="cpu")
    (tmp_path / "file").write_text("not a folder")
    shared = _predict(sample_images, toy_manifest, tmp_path / "two.csv", device="cpu,cpu",
                      cache_dir=tmp_path / "file" / "cache")
    assert shared == single and "running on cpu alone" in caplog.text
