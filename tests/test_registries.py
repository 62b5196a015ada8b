"""Every registered library and kind through the machinery, parametrised over the registries (timm's
`test_models.py` over `list_models()`), each by its own example (`BackboneLibrary.example`, `TowerKind.example`,
made into a manifest by `kaggle_i2p.inference.selfcheck.example_manifest`): a library or kind registered without one
fails here until it has one.

Three blocks, so the suite grows linearly (issue 35, part 3; counted by the last test): each library with the
reference kind (a regressor), each kind on its reference library (the one its tiny example names, else timm), and a
short explicit list of real pairs whose combination is itself worth proving. One more library adds 5 tests, one more
kind 3 (2 for a kind without its own network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import kaggle_i2p
from kaggle_i2p.core.registry import KINDS, LIBRARIES
from kaggle_i2p.inference.cache import PredictionCache
from kaggle_i2p.inference.images import decode_image
from kaggle_i2p.inference.selfcheck import REFERENCE_KIND, example_manifest, home_library, reference_outputs
from kaggle_i2p.manifest import NetworkSpec, kind_of, load_manifest, save_manifest
from kaggle_i2p.models.backbones import library
from kaggle_i2p.models.towers import build_tower, load_initial_weights, load_tower, validate_manifest

LIBRARY_NAMES = LIBRARIES.names()
KIND_NAMES = KINDS.names()
NETWORK_KINDS = tuple(k for k in KIND_NAMES if issubclass(KINDS.get(k).spec, NetworkSpec))  # a network of its own


# the real pairs whose combination is worth its own proof (a library's outputs feeding a kind's own head or step)
REAL_PAIRS = [("open_clip", "retrieval"), ("transformers", "features"), ("export", "fusion"), ("onnx", "regressor")]
PAIRS = sorted({*((lib, REFERENCE_KIND) for lib in LIBRARY_NAMES),  # block 1: each library, the reference kind
                *((home_library(kind), kind) for kind in KIND_NAMES),  # block 2: each kind on its home library
                *REAL_PAIRS})  # block 3


def test_every_registered_library_and_kind_has_an_example(tmp_path):
    for name in LIBRARY_NAMES:
        assert library(name).example(tmp_path / name) is not None, f"library {name!r}: give it an `example`"
    for name in KIND_NAMES:
        (tmp_path / name).mkdir()
        assert KINDS.get(name).example(tmp_path / name, 24, 384) is not None, f"kind {name!r}: give it an `example`"


@pytest.mark.parametrize("name", LIBRARY_NAMES)
def test_a_library_builds_on_the_meta_device_and_answers_for_its_grid(name, tmp_path):
    lib = library(name)
    arch = lib.example(tmp_path)
    arch = str(tmp_path / arch) if lib.arch_is_path(arch) else arch
    with torch.device("meta"):
        built = lib.build(arch, None, 0)
        at_96 = lib.build(arch, 96, 0)
    assert built.out_dim > 0 and all(p.is_meta for p in built.module.parameters())
    if lib.holds_weights:  # a program: its weights are the file's, never the tower's keys, and it is not trained here
        assert not list(built.module.parameters()) and lib.arch_identity(arch) is not None
        return
    grid, patch = lib.position_grid(built.module), lib.patch_size(built.module)
    if grid is not None:  # a ViT: its native size is its grid times its patch, and a new native size moves it
        assert lib.native_size(built.module) == grid[0] * patch
        assert lib.native_size(at_96.module) == 96 and lib.position_grid(at_96.module) == (96 // patch,) * 2
    assert lib.arch_identity(arch) is not None
    names = [n for n, _ in built.module.named_parameters()]
    blocks = [lib.block_of(n) for n in names]
    assert any(b is not None for b in blocks), "no parameter sits in a block: layer-wise LR decay would be flat"
    assert any(lib.is_embedding(n) for n in names), "no parameter is on the input side (layer 0)"


@pytest.mark.parametrize("name", LIBRARY_NAMES)
def test_a_library_loads_its_own_checkpoint_format(name, tmp_path):
    manifest = load_manifest(example_manifest(tmp_path, name, REFERENCE_KIND))
    spec = manifest.towers[0]
    loaded = load_tower(spec)
    torch.manual_seed(0)
    expected = build_tower(spec).state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    if library(name).holds_weights:  # the program's weights are its file's: no pretrained file starts a training run
        return
    # a pretrained file as the library writes it (a bare backbone, or its own wrapping) starts a training run
    fresh = build_tower(spec)
    backbone = {k: v.clone() for k, v in loaded.backbone.state_dict().items()}
    save_file(backbone, str(tmp_path / "pretrained.safetensors"))
    load_initial_weights(fresh, tmp_path / "pretrained.safetensors")
    assert all(torch.equal(fresh.backbone.state_dict()[k], v) for k, v in backbone.items())


@pytest.mark.parametrize(("name", "kind"), PAIRS)
def test_a_manifest_entry_round_trips_and_rebases(name, kind, tmp_path):
    path = example_manifest(tmp_path / "here", name, kind)
    manifest = validate_manifest(path, deep=True)
    spec = manifest.towers[0]
    assert spec.kind == kind and kind_of(spec) is KINDS.get(kind)
    moved = save_manifest(manifest, tmp_path / "there" / "deeper" / "m.yaml")
    assert moved.towers[0] == spec and moved.towers[0].to_dict() == spec.to_dict()
    assert load_manifest(tmp_path / "there" / "deeper" / "m.yaml").towers[0].to_dict(tmp_path) == spec.to_dict(
        tmp_path)


@pytest.mark.parametrize(("name", "kind"), [p for p in PAIRS if p[1] in NETWORK_KINDS])
def test_a_cache_key_is_stable_and_moves_only_with_what_changes_outputs(name, kind, tmp_path):
    path = example_manifest(tmp_path / "a", name, kind)
    cache = PredictionCache(tmp_path / "cache")
    spec = load_manifest(path).towers[0]
    key = cache.tower_key(spec, "fp32", 384, 8)
    moved = save_manifest(load_manifest(path), tmp_path / "b" / "m.yaml").towers[0]  # the same files, elsewhere
    assert cache.tower_key(moved, "fp32", 384, 8) == key
    from dataclasses import replace

    assert cache.tower_key(replace(spec, weight=0.25, name=spec.name), "fp32", 384, 8) == key
    other_image = replace(spec, image=replace(spec.image, mean=(0.4, 0.4, 0.4)))
    assert cache.tower_key(other_image, "fp32", 384, 8) != key
    assert cache.tower_key(spec, "fp32", 384, 16) != key


@pytest.mark.parametrize(("name", "kind"), PAIRS)
def test_a_prediction_on_the_kaggle_sample_is_the_towers_own_forward(name, kind, tmp_path, sample_dir):
    path = example_manifest(tmp_path, name, kind)
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                    batch_size=3)
    spec = load_manifest(path).towers[0]
    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in run.ids]
    what, expected = reference_outputs(spec, run, pixels)  # the tower's own forward, without the run's machinery
    if what == "views":  # features: each view's raw output, as the run keeps it
        for view, want in zip(spec.views, expected, strict=True):
            np.testing.assert_allclose(run.view_outputs["tiny"][view.name], want, atol=2e-5)
        assert "tiny" not in run.tower_embeddings
        return
    np.testing.assert_allclose(run.tower_embeddings["tiny"], expected, atol=2e-5)
    assert np.allclose(np.linalg.norm(run.embeddings, axis=1), 1.0, atol=1e-5)


def test_the_registry_tests_grow_linearly():
    """What this module declares is a few tests per library plus a few per kind plus the real pairs, never
    libraries x kinds (one library and one kind took the old matrix from 49 to 75 tests)."""
    import sys

    declared = 0
    for name, function in vars(sys.modules[__name__]).items():
        if name.startswith("test_") and callable(function):
            marks = [m for m in getattr(function, "pytestmark", []) if m.name == "parametrize"]
            declared += len(marks[0].args[1]) if marks else 1
    network = [pair for pair in PAIRS if pair[1] in NETWORK_KINDS]
    assert len(PAIRS) <= len(LIBRARY_NAMES) + len(KIND_NAMES) + len(REAL_PAIRS)
    # per library: builds, loads; per pair: round trip, prediction (+ the cache key of a network kind); these two
    assert declared == 2 * len(LIBRARY_NAMES) + 2 * len(PAIRS) + len(network) + 2
