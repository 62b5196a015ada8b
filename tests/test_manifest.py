"""Manifest parsing and validation: every bad-manifest kind gives a clear error naming tower, field and fix."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import yaml

from kaggle_i2p.manifest import ManifestError, load_manifest, parse_manifest
from kaggle_i2p.manifest.fields import entry_field
from kaggle_i2p.models.towers import build_tower, check_architectures
from kaggle_i2p.testing import toy_manifest_dict

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: dict, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _problems(tmp_path: Path, data: dict) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(tmp_path, data))
    return str(info.value)


@pytest.fixture
def toy_data(toy_manifest) -> tuple[dict, Path]:
    """The toy manifest as data, with paths made absolute so it can be rewritten anywhere."""
    data = copy.deepcopy(toy_manifest_dict())
    folder = toy_manifest.parent
    data["fallback"] = str(folder / data["fallback"])
    for tower in data["towers"]:
        tower["checkpoint"] = str(folder / tower["checkpoint"])
        if tower["arch"].endswith(".json"):
            tower["arch"] = str(folder / tower["arch"])
    return data, folder


def test_toy_manifest_loads(toy_manifest):
    manifest = load_manifest(toy_manifest)
    assert [t.name for t in manifest.towers] == ["toy_timm_vit", "toy_open_clip_vit"]
    assert manifest.weights == {"toy_timm_vit": 0.6, "toy_open_clip_vit": 0.4}
    assert manifest.towers[0].image.resolutions == (64, 96) and manifest.towers[0].image.n_views == 4
    assert manifest.towers[0].head.hidden == 48
    assert np.isclose(np.linalg.norm(manifest.fallback), 1.0)
    assert manifest.towers[1].checkpoint == toy_manifest.parent / "toy_open_clip_vit.safetensors"


def test_paths_expand_environment_and_resolve_relative(tmp_path, toy_data, monkeypatch):
    data, folder = toy_data
    monkeypatch.setenv("TOY_DIR", str(folder))
    data["towers"][0]["checkpoint"] = "${TOY_DIR}/toy_timm_vit.safetensors"
    data["towers"][1]["checkpoint"] = "${UNSET_TOY_VAR:-" + str(folder) + "}/toy_open_clip_vit.safetensors"
    (tmp_path / "fb.npy").write_bytes((folder / "fallback.npy").read_bytes())
    data["fallback"] = "fb.npy"  # relative: resolves against the manifest's folder, not the cwd
    manifest = load_manifest(_write(tmp_path, data))
    assert manifest.towers[0].checkpoint == folder / "toy_timm_vit.safetensors"
    assert manifest.towers[1].checkpoint == folder / "toy_open_clip_vit.safetensors"
    assert manifest.fallback_path == tmp_path / "fb.npy"


def test_every_schema_problem_is_reported_at_once(tmp_path, toy_data):
    data, _ = toy_data
    data["colour"] = "blue"
    first, second = data["towers"]
    first["learning_rate"] = 0.1
    first["head"]["dropout"] = 0.5
    first["image"]["resolution"] = 224
    first["weight"] = -0.2
    second["name"] = "toy_timm_vit"
    second["checkpoint"] = str(tmp_path / "missing.safetensors")
    second["image"]["resolutions"] = [64, 20000, "big"]
    second["library"] = "keras"
    message = _problems(tmp_path, data)
    expected = [
        "colour: unknown top-level key",
        "tower 'toy_timm_vit' (towers[0]).learning_rate: unknown key",
        "tower 'toy_timm_vit' (towers[0]).head.dropout: unknown key",
        "tower 'toy_timm_vit' (towers[0]).image.resolution: unknown key; allowed: crop_pct, hflip, interpolation,",
        "tower 'toy_timm_vit' (towers[0]).weight: -0.2 is negative",
        "towers[1]).name: duplicates towers[0]",
        f"towers[1]).checkpoint: file not found: {tmp_path / 'missing.safetensors'}",
        "towers[1]).image.resolutions: 20000 must be an integer between 32 and 1024",
        "towers[1]).image.resolutions: 'big' must be an integer",
        "towers[1]).library: 'keras' is not one of timm, open_clip",
        "towers[1]).arch: a .json model config is only supported for library: open_clip",
    ]
    for fragment in expected:
        assert fragment in message, fragment
    assert "11 problem(s)" in message


def test_all_zero_weights(tmp_path, toy_data):
    data, _ = toy_data
    for tower in data["towers"]:
        tower["weight"] = 0
    assert "all weights are zero; give at least one tower a positive weight" in _problems(tmp_path, data)


def test_missing_preprocessing_is_never_guessed(tmp_path, toy_data):
    data, _ = toy_data
    del data["towers"][1]["image"]["mean"]
    del data["towers"][1]["image"]["resolutions"]
    message = _problems(tmp_path, data)
    assert "tower 'toy_open_clip_vit' (towers[1]).image.mean: is required: preprocessing is never guessed" in message
    assert "(towers[1]).image.resolutions: is required" in message


def test_unset_environment_variable(tmp_path, toy_data, monkeypatch):
    data, _ = toy_data
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    data["towers"][0]["checkpoint"] = "${NOT_SET_ANYWHERE}/x.safetensors"
    assert "environment variable NOT_SET_ANYWHERE is not set" in _problems(tmp_path, data)


@pytest.mark.parametrize("vector, fragment", [
    (np.zeros(384), "all zeros; use a mean prompt embedding, never zeros"),
    (np.ones(383), "has shape (383,), expected (384,)"),
    (np.full(384, np.nan), "contains NaN or inf"),
])
def test_bad_fallback(tmp_path, toy_data, vector, fragment):
    data, _ = toy_data
    np.save(tmp_path / "bad.npy", vector)
    data["fallback"] = str(tmp_path / "bad.npy")
    assert fragment in _problems(tmp_path, data)


def test_bad_head_and_checkpoint_suffix(tmp_path, toy_data):
    data, _ = toy_data
    data["towers"][0]["head"] = {"type": "mlp"}
    data["towers"][1]["checkpoint"] = "weights.onnx"
    message = _problems(tmp_path, data)
    assert "head.hidden: an mlp head needs a positive integer hidden size" in message
    assert "checkpoint: 'weights.onnx' must end in one of .safetensors, .pt, .pth, .bin, .ckpt" in message


def test_architecture_checks_resolution_against_patch_size(tmp_path, toy_data):
    data, _ = toy_data
    data["towers"][0]["image"]["resolutions"] = [64, 100]  # test_vit has 16-pixel patches
    data["towers"][1]["arch"] = "no-such-open-clip-model"
    data["towers"][1]["library"] = "open_clip"
    manifest = load_manifest(_write(tmp_path, data))  # schema is fine; the arch checks are separate
    with pytest.raises(ManifestError) as info:
        check_architectures(manifest.towers)
    message = str(info.value)
    assert ("tower 'toy_timm_vit' (towers[0]).image.resolutions: 100 is not a multiple of the patch size 16 of "
            "test_vit; use 96 or 112") in message
    assert ("tower 'toy_open_clip_vit' (towers[1]).arch: cannot build open_clip model "
            "'no-such-open-clip-model'") in message


def test_unknown_timm_arch(tmp_path, toy_data):
    data, _ = toy_data
    data["towers"][0]["arch"] = "vit_hyper_giant_patch3"
    with pytest.raises(ManifestError, match="timm has no model named 'vit_hyper_giant_patch3'"):
        check_architectures(load_manifest(_write(tmp_path, data)).towers)


def test_reference_manifest_validates():
    manifest = load_manifest(ROOT / "weights_manifest.yaml", check_files=False)
    check_architectures(manifest.towers)  # every arch builds (meta device) and runs at every listed resolution
    assert [t.arch for t in manifest.towers] == ["eva02_large_patch14_clip_336", "convnext_xxlarge", "ViT-L-14-336"]
    assert all(str(t.checkpoint).startswith("/kaggle/input/") for t in manifest.towers)
    assert sum(manifest.weights.values()) == pytest.approx(1.0)
    assert np.isclose(np.linalg.norm(manifest.fallback), 1.0)


@pytest.mark.slow
def test_reference_archs_build_with_random_weights():
    """Each reference tower really builds (random weights, on CPU) with the head the manifest declares."""
    manifest = load_manifest(ROOT / "weights_manifest.yaml", check_files=False)
    expected_params = {"eva02_l_336": 303e6, "convnext_xxl": 846e6, "vit_l_14_336": 303e6}
    for spec in manifest.towers:
        tower = build_tower(spec, manifest.embedding_dim).eval()
        n_params = sum(p.numel() for p in tower.backbone.parameters())
        assert n_params == pytest.approx(expected_params[spec.name], rel=0.02), spec.name
        assert tower.head(torch.zeros(2, tower.head.in_features if hasattr(tower.head, "in_features")
                                      else tower.head[0].in_features)).shape == (2, 384)
        del tower


def test_parse_manifest_rejects_non_mapping(tmp_path):
    with pytest.raises(ManifestError, match="must hold a mapping"):
        parse_manifest(["not", "a", "mapping"], tmp_path / "m.yaml")
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_a_manifest_with_every_kind_and_path_field_round_trips_from_another_folder(toy_manifest, tmp_path):
    """The manifest owns its serialisation: rebase every path field, write (validated, atomic), load: equal specs."""
    import shutil

    import numpy as np
    import yaml

    from kaggle_i2p.bank.folder import write_bank
    from kaggle_i2p.core.fileio import sha256_file
    from kaggle_i2p.manifest import rebase_manifest_paths, save_manifest, write_manifest

    source = tmp_path / "source"
    shutil.copytree(toy_manifest.parent, source)
    data = yaml.safe_load((source / toy_manifest.name).read_text())
    np.save(source / "dims.npy", np.linspace(0.5, 1.5, 384, dtype=np.float32))
    write_bank(source / "bank", [f"phrase {i}" for i in range(5)], np.eye(5, 384, dtype=np.float32))
    data["towers"][0].update(sha256=sha256_file(source / "toy_timm_vit.safetensors"), dim_weights="dims.npy")
    retrieval = {**data["towers"][0], "name": "retriever", "kind": "retrieval",
                 "retrieval": {"bank": "bank", "k": 3, "temperature": 0.5, "score": "logits"}}
    for key in ("head", "sha256", "dim_weights"):
        retrieval.pop(key)
    data["towers"] += [retrieval, {"name": "prior", "kind": "prior", "vector": "fallback.npy", "weight": 0.1}]
    original = write_manifest(data, source / "every_kind.yaml")

    out = tmp_path / "elsewhere" / "deeper" / "copy.yaml"
    copied = write_manifest(rebase_manifest_paths(yaml.safe_load((source / "every_kind.yaml").read_text()), source,
                                                  out.parent), out)
    assert load_manifest(out).towers == copied.towers == original.towers  # paths resolve to the same files
    assert [t.kind for t in copied.towers] == ["regressor", "regressor", "retrieval", "prior"]
    assert copied.towers[1].arch == original.towers[1].arch and copied.towers[2].retrieval.bank == source / "bank"
    assert np.array_equal(copied.towers[0].dim_weights, original.towers[0].dim_weights)
    assert np.array_equal(copied.towers[3].vector, original.towers[3].vector)
    assert copied.fallback_path.resolve() == original.fallback_path.resolve()

    # The specs write themselves back (Manifest.to_dict / save_manifest), paths relative to the new folder.
    saved = save_manifest(original, tmp_path / "other" / "saved.yaml")
    reloaded = load_manifest(tmp_path / "other" / "saved.yaml")
    assert reloaded.towers == saved.towers == original.towers and reloaded.embedding_dim == original.embedding_dim
    assert [type(t).__name__ for t in reloaded.towers] == ["RegressorSpec", "RegressorSpec", "RetrievalSpec",
                                                           "PriorSpec"]
    assert reloaded.towers[2].retrieval == original.towers[2].retrieval and reloaded.towers[3].views == ()
    assert np.array_equal(reloaded.towers[0].dim_weights, original.towers[0].dim_weights)
    assert np.array_equal(reloaded.towers[3].vector, original.towers[3].vector)
    assert np.array_equal(reloaded.fallback, original.fallback)
    written = yaml.safe_load((tmp_path / "other" / "saved.yaml").read_text())
    assert written["towers"][0]["checkpoint"] == "../source/toy_timm_vit.safetensors"  # relative, not absolute
    assert written["towers"][2]["retrieval"]["bank"] == "../source/bank" and "head" not in written["towers"][2]
    assert reloaded.to_dict(tmp_path) == original.to_dict(tmp_path)

    broken = dict(data, fallback="missing.npy")
    with pytest.raises(ManifestError, match="missing.npy"):
        write_manifest(broken, tmp_path / "broken.yaml")
    assert not (tmp_path / "broken.yaml").exists()  # a manifest that would not load is never written


@dataclass(frozen=True)
class _Section:
    """A section of every field type the derivation knows."""

    size: int = entry_field(required="the side in pixels", bounds=(32, 1024))
    sizes: tuple[int, ...] = entry_field((), lone=True, bounds=(1, None), hint="e.g. [224, 336]")
    mode: Literal["fast", "exact"] = "exact"
    rate: float = entry_field(0.5, bounds=(0.0, 1.0), high_open=True)
    scale: float = entry_field(1.0, low_open=True)
    rgb: tuple[float, float, float] = entry_field((1.0, 1.0, 1.0), low_open=True)
    names: tuple[str, ...] | None = entry_field(None, hint="source names")
    rename: dict[str, str] | None = None
    flag: bool = entry_field(False, hint="true to do it")
    code: str | None = entry_field(None, check=lambda v: None if v is None or v == "ok" else f"{v!r} is not ok")


def test_a_sections_validation_is_derived_from_its_annotations_and_marks():
    """One derivation checks every section: the types, bounds, choices, lists and mappings of a dataclass's fields,
    its required fields' words, a field's own check and hint, defaults standing in for bad values."""
    from kaggle_i2p.core.validate import Problems
    from kaggle_i2p.manifest.fields import checked_fields

    problems = Problems()
    good = checked_fields(_Section, {"size": 64, "sizes": 224, "mode": "fast", "rate": 0, "scale": 2, "rgb": [1, 2, 3],
                                    "names": ["a", "b"], "rename": {"x.": "y."}, "flag": True, "code": "ok"},
                          "s", problems)
    assert problems.items == []
    assert good == {"size": 64, "sizes": (224,), "mode": "fast", "rate": 0.0, "scale": 2.0, "rgb": (1.0, 2.0, 3.0),
                    "names": ("a", "b"), "rename": {"x.": "y."}, "flag": True, "code": "ok"}

    problems = Problems()
    bad = checked_fields(_Section, {"sizes": [224, 0, 224], "mode": "slow", "rate": 1.0, "scale": 0, "rgb": [1, 0, 1],
                                   "names": "a", "rename": {}, "flag": "yes", "code": "no", "extra": 1}, "s", problems)
    assert problems.items == [
        "s.extra: unknown key; allowed: code, flag, mode, names, rate, rename, rgb, scale, size, sizes",
        "s.size: is required: the side in pixels",
        "s.sizes: 0 must be an integer >= 1 (e.g. [224, 336])",
        "s.sizes: 224 is listed twice (e.g. [224, 336])",
        "s.mode: 'slow' is not one of fast, exact",
        "s.rate: 1.0 must be a number >= 0.0 and < 1.0",
        "s.scale: 0 must be a number > 0.0",
        "s.rgb: [1, 0, 1] must be a list of 3 positive numbers",
        "s.names: 'a' must be a list, not empty (source names)",
        "s.rename: {} must map names to values",
        "s.flag: 'yes' must be true or false (true to do it)",
        "s.code: 'no' is not ok",
    ]
    assert "size" not in bad  # a required field with a problem is left out; the others take their defaults
    assert bad == {"sizes": (), "mode": "exact", "rate": 0.5, "scale": 1.0, "rgb": (1.0, 1.0, 1.0), "names": None,
                   "rename": None, "flag": False, "code": None}


@pytest.mark.parametrize("check_files", [True, False])
def test_an_unset_variable_in_any_path_is_one_problem_never_a_traceback(tmp_path, monkeypatch, check_files):
    """`${VAR}` paths go through one expansion that reports an unset variable (the interrogator's banks and CLIP
    config raised KeyError); without the file check a checkpoint's variable may be set where the files are."""
    monkeypatch.delenv("I2P_NOT_SET", raising=False)
    np.save(tmp_path / "fb.npy", np.ones(384, dtype=np.float32))
    image = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize": "squash", "resolutions": [64]}
    data = {"fallback": "fb.npy", "towers": [{
        "name": "i", "kind": "interrogator", "library": "open_clip", "arch": "x.json", "checkpoint": "c.safetensors",
        "image": image, "weight": 1, "interrogator": {
            "phrase_banks": "${I2P_NOT_SET}/p", "templates": ["{a}"], "clip_arch": "${I2P_NOT_SET}/c.json",
            "clip_checkpoint": "${I2P_NOT_SET}/c.safetensors", "text_model": "t"}}]}
    with pytest.raises(ManifestError) as caught:
        parse_manifest(data, tmp_path / "m.yaml", check_files=check_files)
    unset = [p for p in caught.value.problems if "environment variable I2P_NOT_SET is not set" in p]
    fields = {p.split(": ")[0].rsplit(".", 1)[1] for p in unset}
    assert fields == ({"phrase_banks", "clip_arch", "clip_checkpoint"} if check_files else {"phrase_banks",
                                                                                          "clip_arch"})
