"""A library and a kind from outside the package (tests/tiny_plugin.py): registered from a notebook cell, or found
through the entry-point groups of a package installed beside ours; validated deeply and predicted with, giving the
vectors the plugin's own definition says."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.registry import KINDS, LIBRARIES
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.manifest import load_manifest, parse_manifest, save_manifest
from kaggle_i2p.models.towers import build_tower

TESTS = Path(__file__).resolve().parent
MEAN, STD, SCALE, MIX = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3], [1.0, 2.0, 0.5], 0.7


@pytest.fixture
def plugin():
    """The plugin registered as a notebook cell would (`register_library`, `register_kind`), removed afterwards."""
    import tiny_plugin

    tiny_plugin.register()
    yield tiny_plugin
    LIBRARIES.unregister(tiny_plugin.LIBRARY.name)
    KINDS.unregister(tiny_plugin.KIND.name)


def plugin_manifest(folder: Path) -> tuple[Path, dict]:
    """A one-tower manifest of the plugin's kind and library, its checkpoint and anchor; (path, tower weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PRIOR_PATH, folder / "fallback.npy")
    anchor = np.random.default_rng(3).normal(size=384)
    np.save(folder / "anchor.npy", anchor / np.linalg.norm(anchor))
    data = {"embedding_dim": 384, "fallback": "fallback.npy", "towers": [
        {"name": "plug", "kind": "anchored", "library": "meanrgb", "arch": "rgb", "checkpoint": "plug.safetensors",
         "image": {"mean": MEAN, "std": STD, "interpolation": "bilinear", "resize": "squash", "resolutions": [64]},
         "weight": 1.0, "anchor": "anchor.npy", "mix": MIX}]}
    path = folder / "plugin_manifest.yaml"
    spec = parse_manifest(data, path, check_files=False).towers[0]
    torch.manual_seed(0)
    tower = build_tower(spec)
    with torch.no_grad():
        tower.backbone.scale.copy_(torch.tensor(SCALE))
    state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(folder / "plug.safetensors"))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, state


def expected_vectors(image_dir: Path, state: dict, anchor: np.ndarray) -> dict[str, np.ndarray]:
    """The plugin's definition computed here, from the image files: channel means, normalised and scaled, the linear
    head, then pulled towards the anchor and made unit length."""
    out = {}
    for path in sorted(image_dir.iterdir()):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
        features = (pixels.mean(axis=(0, 1)) - MEAN) / STD * SCALE
        raw = state["head.weight"].double().numpy() @ features + state["head.bias"].double().numpy()
        pulled = raw + MIX * anchor
        out[path.stem] = pulled / np.linalg.norm(pulled)
    return out


def check_predictions(csv: Path, expected: dict[str, np.ndarray]) -> None:
    frame = pd.read_csv(csv)
    got = {}
    for image_id, group in frame.assign(image=frame.imgId_eId.str.rsplit("_", n=1).str[0]).groupby("image"):
        order = group.imgId_eId.str.rsplit("_", n=1).str[1].astype(int).argsort()
        got[image_id] = group.val.to_numpy()[order]
    assert sorted(got) == sorted(expected)
    for image_id, vector in expected.items():
        # the pipeline resizes to 64 x 64 before averaging: the channel means move in the third decimal
        assert float(np.dot(got[image_id], vector)) > 0.999, image_id
    assert min(float(np.dot(got[a], got[b])) for a in got for b in got if a < b) < 0.99  # images differ


def test_a_notebook_registered_library_and_kind_validate_and_predict(plugin, sample_images, tmp_path):
    manifest, state = plugin_manifest(tmp_path / "m")
    assert main(["validate-manifest", "--deep", str(manifest)]) == 0
    out = tmp_path / "submission.csv"
    assert main(["predict", str(sample_images), "--manifest", str(manifest), "--out", str(out), "--device", "cpu",
                 "--workers", "0", "--quiet"]) == 0
    check_predictions(out, expected_vectors(sample_images, state, np.load(tmp_path / "m" / "anchor.npy")))


def test_a_plugin_kind_of_the_old_after_encoding_signature_still_runs_and_is_told_the_new_one(
        plugin, sample_images, tmp_path, monkeypatch):
    """Issue 35, part 1: one `after_encoding(spec, outputs, context)`; a kind written for (spec, outputs, device,
    progress) is called that way until 0.3.0, with a FutureWarning naming the new signature."""
    def old(spec, outputs, device, progress):
        pulled = outputs.astype(np.float64) + spec.mix * spec.anchor
        return (pulled / np.linalg.norm(pulled, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(plugin.KIND, "after_encoding", old)
    manifest, state = plugin_manifest(tmp_path / "m")
    out = tmp_path / "submission.csv"
    with pytest.warns(FutureWarning, match=r"tower kind 'anchored': after_encoding\(spec, outputs, device, progress\) "
                                           r"is the old signature; take \(spec, outputs, context\)"):
        assert main(["predict", str(sample_images), "--manifest", str(manifest), "--out", str(out), "--device",
                     "cpu", "--workers", "0", "--quiet"]) == 0
    check_predictions(out, expected_vectors(sample_images, state, np.load(tmp_path / "m" / "anchor.npy")))


def test_a_plugin_kind_is_written_rebased_and_keyed_by_its_field_marks(plugin, tmp_path):
    manifest, _ = plugin_manifest(tmp_path / "m")
    loaded = load_manifest(manifest)
    entry = loaded.towers[0].to_dict(manifest.parent)
    assert entry["anchor"] == "anchor.npy" and entry["mix"] == MIX and entry["kind"] == "anchored"
    moved = save_manifest(loaded, tmp_path / "elsewhere" / "m.yaml")
    raw = yaml.safe_load((tmp_path / "elsewhere" / "m.yaml").read_text())["towers"][0]
    assert raw["anchor"] == "../m/anchor.npy" and moved.towers[0].anchor_path == loaded.towers[0].anchor_path
    from kaggle_i2p.inference.cache import PredictionCache

    cache = PredictionCache(tmp_path / "cache")
    key = cache.tower_key(loaded.towers[0], "fp32", 384, 8)
    other = parse_manifest({**yaml.safe_load(manifest.read_text()), "towers": [
        {**yaml.safe_load(manifest.read_text())["towers"][0], "mix": 0.1}]}, manifest).towers[0]
    assert cache.tower_key(other, "fp32", 384, 8) == key  # marked identity=False: a step after the cache


def test_a_plugin_library_problem_is_a_manifest_problem(plugin, tmp_path, capsys):
    manifest, _ = plugin_manifest(tmp_path / "m")
    manifest.write_text(manifest.read_text().replace("arch: rgb", "arch: rgbx"))
    assert main(["validate-manifest", "--deep", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "tower 'plug' (towers[0]).arch: cannot build meanrgb model 'rgbx': meanrgb has no model named" in err


def test_unregistered_names_list_what_is_registered(tmp_path):
    manifest, _ = plugin_manifest_without_registering(tmp_path)
    with pytest.raises(kaggle_i2p.ManifestError) as err:
        load_manifest(manifest)
    assert "towers[0]).kind: 'anchored' is not one of regressor, retrieval, prior" in str(err.value)


def plugin_manifest_without_registering(tmp_path: Path) -> tuple[Path, None]:
    path = tmp_path / "m.yaml"
    shutil.copyfile(PRIOR_PATH, tmp_path / "fallback.npy")
    path.write_text(yaml.safe_dump({"fallback": "fallback.npy", "towers": [
        {"name": "plug", "kind": "anchored", "library": "meanrgb", "arch": "rgb", "checkpoint": "p.safetensors",
         "image": {}, "weight": 1.0}]}))
    return path, None


def test_an_installed_plugin_is_found_through_its_entry_points(tmp_path, sample_images):
    """A package beside ours (its dist-info naming our entry-point groups): a fresh process finds both, validates
    and predicts; the registry never needed an edit."""
    import tiny_plugin

    tiny_plugin.register()  # to write the manifest here; the fresh processes know nothing of it
    try:
        manifest, state = plugin_manifest(tmp_path / "m")
    finally:
        LIBRARIES.unregister(tiny_plugin.LIBRARY.name)
        KINDS.unregister(tiny_plugin.KIND.name)
    site = tmp_path / "site"
    info = site / "tiny_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kaggle_i2p.libraries]\nmeanrgb = tiny_plugin:LIBRARY\n\n"
                                           "[kaggle_i2p.kinds]\nanchored = tiny_plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(TESTS)]), "HOME": str(tmp_path)}
    out = tmp_path / "submission.csv"
    for args in (["validate-manifest", "--deep", str(manifest)],
                 ["predict", str(sample_images), "--manifest", str(manifest), "--out", str(out), "--device", "cpu",
                  "--workers", "0", "--quiet"]):
        done = subprocess.run([sys.executable, "-m", "kaggle_i2p.cli", *args], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    check_predictions(out, expected_vectors(sample_images, state, np.load(tmp_path / "m" / "anchor.npy")))
    listed = subprocess.run([sys.executable, "-c", "from kaggle_i2p.core.registry import KINDS, LIBRARIES; import json;"
                             "print(json.dumps([LIBRARIES.names(), KINDS.names()]))"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert json.loads(listed.stdout) == [["timm", "open_clip", "transformers", "export", "torchscript", "onnx",
                                          "meanrgb"], ["regressor", "retrieval", "prior", "caption", "interrogator",
                                                       "features", "fusion", "anchored"]]


def test_the_package_own_are_listed_without_importing_and_imported_one_at_a_time():
    """Issue 35, part 3: the built-ins are declared as plugins are ("module:attribute"); listing the names, or
    checking one, imports nothing, and asking for one imports its module alone."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from kaggle_i2p.core.registry import KINDS, LIBRARIES\n"
             "names = LIBRARIES.names(), KINDS.names(), 'timm' in LIBRARIES, 'fusion' in KINDS\n"
             "mods = lambda: sorted(m.rsplit('.', 1)[1] for m in sys.modules\n"
             "                      if m.startswith(('kaggle_i2p.models.backbones.', 'kaggle_i2p.kinds.')))\n"
             "print(names); print(mods()); LIBRARIES.get('timm'); print(mods())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == ("(('timm', 'open_clip', 'transformers', 'export', 'torchscript', 'onnx'), ('regressor', "
                      "'retrieval', 'prior', 'caption', 'interrogator', 'features', 'fusion'), True, True)")
    assert out[1] == "[]"  # nothing imported by listing
    assert "timm_models" in out[2] and "open_clip_models" not in out[2] and "transformers_models" not in out[2]
