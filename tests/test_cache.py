"""The prediction cache: reuse, targeted invalidation, and byte-identical resume after a real kill."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import kaggle_i2p
from kaggle_i2p.inference import predict as predict_module
from kaggle_i2p.inference.cache import PredictionCache
from kaggle_i2p.inference.predict import TowerRunner
from kaggle_i2p.manifest import load_manifest

OPTIONS = {"device": "cpu", "num_workers": 0, "progress": False, "batch_size": 2, "cache_chunk_size": 4}


@pytest.fixture
def many_images(tmp_path, sample_dir) -> Path:
    """28 real sample images (4 copies of the 7, under distinct ids)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for copy in range(4):
        for path in sorted((sample_dir / "images").iterdir()):
            shutil.copy(path, folder / f"{copy}_{path.name}")
    return folder


@pytest.fixture
def forward_counter(monkeypatch) -> Counter:
    """Counts forward passes per tower name."""
    counts: Counter = Counter()
    real = TowerRunner.forward_view

    def counting(self, views):
        counts[self.spec.name] += len(views)
        return real(self, views)

    monkeypatch.setattr(TowerRunner, "forward_view", counting)
    return counts


def _shards(cache: Path) -> list[Path]:
    """Complete shards (a killed writer can leave a hidden temporary file, which never counts)."""
    return sorted(p for p in cache.rglob("*.npz") if not p.name.startswith("."))


def test_second_run_comes_from_cache_with_identical_bytes(many_images, toy_manifest, tmp_path, monkeypatch):
    plain = tmp_path / "plain.csv"
    kaggle_i2p.predict_dir(many_images, toy_manifest, out_csv=plain, **OPTIONS)
    first = tmp_path / "first.csv"
    kaggle_i2p.predict_dir(many_images, toy_manifest, out_csv=first, cache_dir=tmp_path / "cache", **OPTIONS)
    assert len(_shards(tmp_path / "cache")) == 7 * (4 + 2)  # 7 chunks x (4 + 2) views

    monkeypatch.setattr(predict_module, "load_tower", lambda *a, **k: pytest.fail("a tower was loaded"))
    monkeypatch.setattr(predict_module, "image_loader", lambda paths, *a, batches=None, **k: [] if not batches
                        else pytest.fail("images were decoded"))
    second = tmp_path / "second.csv"
    run = kaggle_i2p.run_prediction(many_images, toy_manifest, cache_dir=tmp_path / "cache", **OPTIONS)
    kaggle_i2p.inference.submission.write_submission(run.ids, run.embeddings, second)
    assert run.summary.cached_images == 28
    assert plain.read_bytes() == first.read_bytes() == second.read_bytes()


def test_changing_one_tower_recomputes_only_that_tower(many_images, toy_manifest, tmp_path, forward_counter):
    cache = tmp_path / "cache"
    kaggle_i2p.predict_dir(many_images, toy_manifest, out_csv=None, cache_dir=cache, **OPTIONS)
    assert forward_counter == {"toy_timm_vit": 28 * 4, "toy_open_clip_vit": 28 * 2}

    folder = tmp_path / "changed"
    shutil.copytree(toy_manifest.parent, folder)
    state = load_file(str(folder / "toy_open_clip_vit.safetensors"))
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(folder / "toy_open_clip_vit.safetensors"))
    forward_counter.clear()
    run = kaggle_i2p.run_prediction(many_images, folder / "toy_manifest.yaml", cache_dir=cache, **OPTIONS)
    assert forward_counter == {"toy_open_clip_vit": 28 * 2}
    assert run.summary.cached_images == 0  # every chunk lacked the new tower


def test_new_view_and_changed_image_recompute_only_what_is_missing(many_images, toy_manifest, tmp_path,
                                                                  forward_counter):
    cache = tmp_path / "cache"
    kaggle_i2p.predict_dir(many_images, toy_manifest, out_csv=None, cache_dir=cache, **OPTIONS)
    data = yaml.safe_load(toy_manifest.read_text())
    data["towers"][1]["image"]["resolutions"] = [64, 80, 96]
    manifest = toy_manifest.parent / "more_views.yaml"
    manifest.write_text(yaml.safe_dump(data))
    forward_counter.clear()
    kaggle_i2p.predict_dir(many_images, manifest, out_csv=None, cache_dir=cache, **OPTIONS)
    assert forward_counter == {"toy_open_clip_vit": 28}  # only r96, for every image

    changed = sorted(many_images.iterdir())[9]  # in the third chunk of 4
    changed.write_bytes(changed.read_bytes())
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    forward_counter.clear()
    kaggle_i2p.predict_dir(many_images, manifest, out_csv=None, cache_dir=cache, **OPTIONS)
    assert forward_counter == {"toy_timm_vit": 4 * 4, "toy_open_clip_vit": 4 * 3}  # its chunk of 4, all views


def test_damaged_shard_is_recomputed(many_images, toy_manifest, tmp_path, forward_counter):
    cache = tmp_path / "cache"
    reference = kaggle_i2p.run_prediction(many_images, toy_manifest, cache_dir=cache, **OPTIONS)
    _shards(cache)[0].write_bytes(b"garbage")
    forward_counter.clear()
    again = kaggle_i2p.run_prediction(many_images, toy_manifest, cache_dir=cache, **OPTIONS)
    assert sum(forward_counter.values()) == 4  # one view of one chunk of 4 images
    assert (again.embeddings == reference.embeddings).all()


def test_unreadable_images_are_remembered(many_images, toy_manifest, tmp_path):
    (many_images / "zz_empty.png").write_bytes(b"")
    cache = tmp_path / "cache"
    first = kaggle_i2p.run_prediction(many_images, toy_manifest, cache_dir=cache, **OPTIONS)
    second = kaggle_i2p.run_prediction(many_images, toy_manifest, cache_dir=cache, **OPTIONS)
    assert first.summary.fallbacks == second.summary.fallbacks == [("zz_empty", "unreadable image (empty file)")]
    assert second.summary.cached_images == 29 and (first.embeddings == second.embeddings).all()


KILLABLE_RUN = """
import sys
import kaggle_i2p
from kaggle_i2p.testing import slow_towers

slow_towers(0.05)
kaggle_i2p.predict_dir(sys.argv[1], sys.argv[2], out_csv=sys.argv[3], cache_dir=sys.argv[4], device="cpu",
                       num_workers=0, batch_size=2, cache_chunk_size=4, progress=False)
"""


def test_killed_run_resumes_to_identical_bytes(many_images, toy_manifest, tmp_path, forward_counter):
    cache, killed_csv = tmp_path / "cache", tmp_path / "killed.csv"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, str(many_images), str(toy_manifest),
                                str(killed_csv), str(cache)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_shards(cache)) < 10 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    done = len(_shards(cache))
    assert 10 <= done < 42 and not killed_csv.exists()

    resumed = tmp_path / "resumed.csv"
    kaggle_i2p.predict_dir(many_images, toy_manifest, out_csv=resumed, cache_dir=cache, **OPTIONS)
    assert 0 < sum(forward_counter.values()) < 28 * 6  # only what the killed run had not stored

    uninterrupted = tmp_path / "uninterrupted.csv"
    kaggle_i2p.predict_dir(many_images, toy_manifest, out_csv=uninterrupted, **OPTIONS)
    assert resumed.read_bytes() == uninterrupted.read_bytes()


def test_tower_key_covers_what_decides_outputs(toy_manifest, tmp_path):
    spec = load_manifest(toy_manifest).towers[0]
    cache = PredictionCache(tmp_path / "c")
    key = cache.tower_key(spec, "fp32", 384, 8)

    assert cache.tower_key(dataclasses.replace(spec, weight=0.1), "fp32", 384, 8) == key
    assert cache.tower_key(spec, "bf16", 384, 8) != key
    assert cache.tower_key(dataclasses.replace(spec, image=dataclasses.replace(spec.image, mean=(0.5,) * 3)),
                           "fp32", 384, 8) != key
    assert cache.tower_key(dataclasses.replace(spec, image=dataclasses.replace(spec.image, resolutions=(64,))),
                           "fp32", 384, 8) == key  # views are keyed one by one, not by the list
    assert cache.tower_key(spec, "fp32", 384, 5) != key  # batch size changes the last bits of a batch's outputs


REFERENCE_TOWER_KEYS = {  # the reference manifest's keys (checkpoint hash fixed): a user's 8-hour cache stays valid
    "eva02_l_336": "eva02_l_336-b2e0eb5d6af6d676918d8b2c",
    "convnext_xxl": "convnext_xxl-48d10d8465da33cb80fc7b34",
    "vit_l_14_336": "vit_l_14_336-7b79ed8f9220ceb31c099b74",
}


def test_the_reference_manifests_cache_keys_never_change(tmp_path, monkeypatch):
    """Restructuring the package (issue 22) must keep every existing cache valid: the keys are pinned here."""
    from pathlib import Path

    from kaggle_i2p.inference.cache import PredictionCache
    from kaggle_i2p.manifest import load_manifest

    monkeypatch.setattr(PredictionCache, "weights_sha256", lambda self, spec, dim: "0" * 64)
    cache = PredictionCache(tmp_path / "cache")
    manifest = load_manifest(Path(__file__).resolve().parents[1] / "weights_manifest.yaml", check_files=False)
    assert {s.name: cache.tower_key(s, "fp16", 384, 32) for s in manifest.towers} == REFERENCE_TOWER_KEYS


def test_a_bank_searching_towers_cache_key_never_changes(tmp_path, monkeypatch):
    """The retrieval kind's identity (queries: its score and key width, not its bank) as computed before issue 22."""
    from kaggle_i2p.inference.cache import PredictionCache
    from kaggle_i2p.manifest import load_manifest
    from kaggle_i2p.testing import build_clip_retrieval

    monkeypatch.setattr(PredictionCache, "weights_sha256", lambda self, spec, dim: "0" * 64)
    path = build_clip_retrieval(tmp_path, {"k": 8, "temperature": 0.1, "score": "embedding", "search": "exact"})
    spec = load_manifest(path).towers[0]
    assert PredictionCache(tmp_path / "cache").tower_key(spec, "fp16", 384, 32) == "clip-bad18ede268c77019bbcdcf6"


def test_a_plugin_kinds_path_field_is_keyed_by_its_content(tmp_path, monkeypatch):
    """A plugin kind's path field that changes its outputs: the file rewritten in place (same size, its modification
    time set back) is a new cache key, the same file moved elsewhere keeps the key."""
    import os
    from dataclasses import dataclass
    from typing import ClassVar

    import numpy as np
    import tiny_plugin
    import yaml
    from torch import nn

    from kaggle_i2p.core.registry import KINDS, register_kind
    from kaggle_i2p.core.validate import resolve_file
    from kaggle_i2p.inference.cache import PredictionCache
    from kaggle_i2p.manifest import NetworkSpec, TowerKind, entry_field, load_manifest, parse_network

    @dataclass(frozen=True, kw_only=True)
    class BiasSpec(NetworkSpec):
        kind: ClassVar[str] = "bias_table_test"
        table: Path = entry_field(path=True)  # read by the head: it changes the outputs

    class BiasKind(TowerKind):
        name = "bias_table_test"
        spec = BiasSpec

        def parse(self, raw, name, label, ctx):
            return parse_network(raw, name, label, ctx, self, lambda r, lab, c: {
                "table": resolve_file(r.get("table"), c.base_dir, f"{lab}.table", c.problems, "bias table")})

        def build_head(self, spec, in_dim, embedding_dim):
            return nn.Linear(in_dim, embedding_dim)

    IMAGE = {"resolutions": [32], "interpolation": "bilinear", "resize": "squash", "mean": [0.5] * 3,
             "std": [0.5] * 3}
    tiny_plugin.register()
    register_kind(BiasKind())
    try:
        monkeypatch.setattr(PredictionCache, "weights_sha256", lambda self, spec, dim: "0" * 64)
        cache = PredictionCache(tmp_path / "cache")
        np.save(tmp_path / "fallback.npy", np.ones(384, np.float32))

        def key(folder: Path) -> str:
            manifest = folder / "m.yaml"
            manifest.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(tmp_path / "fallback.npy"),
                                                "towers": [{"name": "b", "kind": "bias_table_test",
                                                            "library": "meanrgb", "arch": "mean_rgb",
                                                            "checkpoint": "b.safetensors", "weight": 1.0,
                                                            "table": "table.npy", "image": IMAGE}]}))
            return cache.tower_key(load_manifest(manifest, check_files=False).towers[0], "fp32", 384, 8)

        table = tmp_path / "a" / "table.npy"
        table.parent.mkdir()
        np.save(table, np.zeros(384, np.float32))
        first = key(table.parent)
        stat = table.stat()
        np.save(table, np.full(384, 0.5, np.float32))  # the same size, rewritten in place
        os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert key(table.parent) != first
        moved = tmp_path / "b" / "table.npy"
        moved.parent.mkdir()
        np.save(moved, np.zeros(384, np.float32))  # the first content, elsewhere
        assert key(moved.parent) == first
    finally:
        KINDS.unregister("bias_table_test")
