"""`kind: fusion` (issue 33, part 6): a learned head over other towers' results, concatenated in a declared order;
the inputs run and are cached as any tower (a `kind: features` tower gives a backbone's pooled features); the fusion is
validated, computed after every tower, scored and tuned like any tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import kaggle_i2p
from kaggle_i2p.core.ensemble import combine_views
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.kinds.regressor import HeadSpec, build_head
from kaggle_i2p.manifest import ManifestError, load_manifest
from kaggle_i2p.models.towers import build_tower, validate_manifest
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD

IMAGE = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash", "resolutions": [64, 96],
         "hflip": True}
HEAD = {"type": "mlp", "hidden": 48, "norm": "layernorm", "activation": "gelu"}
FEATURES_WIDTH = 64  # test_vit's pooled features


def _write(folder, towers: list[dict], name: str = "fusion.yaml") -> object:
    path = folder / name
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": towers},
                                   sort_keys=False))
    return path


@pytest.fixture(scope="module")
def fusion_manifest(tmp_path_factory):
    """A regressor (its embedding), a features tower (test_vit's pooled features) and a fusion MLP over both, each
    with random weights; the fusion's head saved as the user's own module saves it (its keys without `head.`)."""
    folder = tmp_path_factory.mktemp("fusion")
    regressor = {"name": "reg", "library": "timm", "arch": "test_vit", "checkpoint": "reg.safetensors",
                 "head": {"type": "linear"}, "image": IMAGE, "weight": 0.5}
    features = {"name": "feats", "kind": "features", "library": "timm", "arch": "test_vit",
                "checkpoint": "feats.safetensors", "image": {**IMAGE, "resolutions": [64]}, "weight": 0}
    fusion = {"name": "fused", "kind": "fusion", "inputs": ["reg", {"tower": "feats", "output": "features"}],
              "head": HEAD, "checkpoint": "fused.safetensors", "weight": 1.0}
    path = _write(folder, [regressor, features, fusion])
    inputs = load_manifest(_write(folder, [regressor, features], "inputs.yaml"), check_files=False).towers
    for seed, entry, spec in ((1, regressor, inputs[0]), (2, features, inputs[1])):
        torch.manual_seed(seed)
        save_file({k: v.contiguous() for k, v in build_tower(spec).state_dict().items()},
                  str(folder / entry["checkpoint"]))
    torch.manual_seed(3)
    head = build_head(384 + FEATURES_WIDTH, HeadSpec(type="mlp", hidden=48, norm="layernorm", activation="gelu"), 384)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, 0.2)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "fused.safetensors"))
    return path, head.eval()


def test_a_fusion_tower_is_its_head_over_its_inputs_in_order(fusion_manifest, sample_dir, tmp_path, monkeypatch):
    path, head = fusion_manifest
    manifest = load_manifest(path)
    fused = manifest.towers[2]
    assert (fused.in_dim, fused.out_dim) == (384 + FEATURES_WIDTH, 384)
    assert "fusion of reg, feats (features) (448 wide) through a mlp head" in fused.describe()
    options = {"device": "cpu", "num_workers": 0, "progress": False, "cache_dir": tmp_path / "cache"}
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, **options)
    views = run.view_outputs
    embedding = combine_views(list(views["reg"].values()))
    features = np.mean(np.stack(list(views["feats"].values())), axis=0)
    with torch.no_grad():
        want = head(torch.from_numpy(np.concatenate([embedding, features], axis=1))).numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(run.tower_embeddings["fused"], want, atol=1e-5)
    assert "feats" not in run.tower_embeddings  # features are no embedding: never weighted
    weighted = 0.5 * run.tower_embeddings["reg"] + 1.0 * run.tower_embeddings["fused"]
    weighted /= np.linalg.norm(weighted, axis=1, keepdims=True)
    np.testing.assert_allclose(run.embeddings, weighted, atol=1e-5)
    assert np.dot(run.tower_embeddings["fused"][0], run.tower_embeddings["fused"][1]) < 0.999  # depends on the image

    from kaggle_i2p.inference.predict import TowerRunner

    monkeypatch.setattr(TowerRunner, "forward_view", lambda *a: pytest.fail("recomputed"))
    again = kaggle_i2p.run_prediction(sample_dir / "images", path, **options)  # the inputs come from the cache
    np.testing.assert_array_equal(again.embeddings, run.embeddings)


def test_an_input_tower_of_weight_zero_still_runs_for_the_fusion(fusion_manifest, sample_dir, tmp_path):
    path, _ = fusion_manifest
    data = yaml.safe_load(path.read_text())
    data["towers"][0]["weight"] = 0
    solo = tmp_path / "solo.yaml"
    data["fallback"] = str(PRIOR_PATH)
    solo.write_text(yaml.safe_dump({**data, "towers": [{**t, "checkpoint": str(path.parent / t["checkpoint"])}
                                                       for t in data["towers"]]}))
    run = kaggle_i2p.run_prediction(sample_dir / "images", solo, device="cpu", num_workers=0, progress=False)
    np.testing.assert_allclose(run.embeddings, run.tower_embeddings["fused"], atol=1e-6)


def test_evaluate_and_tune_score_and_weight_the_fusion_like_any_tower(fusion_manifest, sample_dir, tmp_path):
    from kaggle_i2p.tuning.evaluate import evaluate_run, load_targets, tune_run

    path, _ = fusion_manifest
    manifest = load_manifest(path)
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                    include_zero_weight=True)
    targets = load_targets(run.ids, prompts_csv=sample_dir / "prompts.csv", embedding_dim=384)
    report = evaluate_run(run, manifest, targets)
    assert "fused" in report.to_json() and "reg" in report.to_json()
    tuned, _ = tune_run(run, manifest, targets, np.arange(7) % 2)
    assert set(tuned.weights) >= {"reg", "fused"}


@pytest.mark.parametrize(("edit", "field", "message"), [
    (lambda t: t[2].update(inputs=["reg", "nosuch"]), "inputs", "'nosuch' is not a tower of this manifest"),
    (lambda t: t[2].update(inputs=[{"tower": "reg", "output": "features"}]), "inputs[0]",
     "'reg' gives an embedding, not features"),
    (lambda t: t[2].update(inputs=["feats"]), "inputs[0]", "'feats' is a features tower: read it with output"),
    (lambda t: t[1].update(weight=0.3), "weight", "a features tower's output is not an embedding"),
    (lambda t: t[2].update(inputs=[{"tower": "reg", "output": "logits"}]), "inputs[0].output",
     "'logits' is not one of embedding, features"),
])
def test_fusion_inputs_are_checked_against_the_towers_they_name(fusion_manifest, tmp_path, edit, field, message):
    path, _ = fusion_manifest
    towers = yaml.safe_load(path.read_text())["towers"]
    towers = [{**t, "checkpoint": str(path.parent / t["checkpoint"])} for t in towers]
    edit(towers)
    import re

    with pytest.raises(ManifestError, match=rf"\.{re.escape(field)}: .*{re.escape(message)}"):
        load_manifest(_write(tmp_path, towers))


def test_a_fusion_head_that_does_not_fit_its_inputs_is_a_deep_problem(fusion_manifest, tmp_path):
    path, _ = fusion_manifest
    towers = yaml.safe_load(path.read_text())["towers"]
    towers = [{**t, "checkpoint": str(path.parent / t["checkpoint"])} for t in towers]
    towers[2]["inputs"] = ["reg"]  # 384 wide now: the head was trained on 448
    with pytest.raises(ManifestError, match=r"fused.*\.checkpoint: the head's file does not match a mlp head from "
                                            r"384 inputs"):
        validate_manifest(_write(tmp_path, towers), deep=True)


def test_a_fusion_manifest_writes_back_as_it_was_read(fusion_manifest, tmp_path):
    from kaggle_i2p.manifest.write import save_manifest

    path, _ = fusion_manifest
    out = tmp_path / "copy" / "m.yaml"
    out.parent.mkdir()
    save_manifest(load_manifest(path), out)
    written = yaml.safe_load(out.read_text())["towers"][2]
    assert written["inputs"] == ["reg", {"tower": "feats", "output": "features"}]
    import os

    assert written["checkpoint"] == os.path.relpath(path.parent / "fused.safetensors", out.parent)
    assert load_manifest(out).towers[2].in_dim == 384 + FEATURES_WIDTH
