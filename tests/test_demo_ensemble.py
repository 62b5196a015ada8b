"""The real-weight demo ensemble, and retrieval and prior towers through the real prediction pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import kaggle_i2p
from kaggle_i2p.bank.folder import Bank, write_bank
from kaggle_i2p.cli import main
from kaggle_i2p.core.ensemble import l2_normalize
from kaggle_i2p.demo.ensemble import build_demo_ensemble, imagenet_phrases
from kaggle_i2p.inference.dryrun import dry_run
from kaggle_i2p.inference.images import decode_image, make_view
from kaggle_i2p.kinds.retrieval import RetrievalHead
from kaggle_i2p.manifest import ManifestError, load_manifest
from kaggle_i2p.models.towers import build_tower, check_architectures, load_tower
from kaggle_i2p.testing import build_clip_retrieval


def test_demo_beats_the_prior_on_the_sample(demo_manifest):
    report = dry_run(manifest=demo_manifest, device="cpu", num_workers=0, progress=False, check_embeddings=False)
    assert report.format_ok
    assert report.fallback_mean_cosine == pytest.approx(0.3541, abs=1e-3)  # the prior alone
    assert report.mean_cosine > report.fallback_mean_cosine + 0.01
    assert report.mean_cosine == pytest.approx(0.3704, abs=2e-3)


def test_demo_is_reproducible_and_valid(demo_manifest, tmp_path):
    manifest = load_manifest(demo_manifest)
    check_architectures(manifest.towers)
    assert [t.kind for t in manifest.towers] == ["retrieval", "prior"]
    assert manifest.towers[0].retrieval.rows == 1000 and manifest.towers[0].retrieval.k == 10
    again = build_demo_ensemble(tmp_path / "again")
    for name in ("efficientnet_lite0.safetensors", "imagenet_phrases/targets.npy", "demo_manifest.yaml"):
        assert (again.parent / name).read_bytes() == (demo_manifest.parent / name).read_bytes(), name
    phrases = imagenet_phrases()
    assert phrases[245] == "a photo of a French bulldog." and len(phrases) == 1000
    assert Bank.open(demo_manifest.parent / "imagenet_phrases").texts([245]) == [phrases[245]]


def test_manifest_demo_and_dry_run_default(demo_manifest, monkeypatch, capsys, tmp_path, sample_dir):
    from kaggle_i2p.demo import ensemble as demo_ensemble
    from kaggle_i2p.inference import dryrun

    monkeypatch.setattr(demo_ensemble, "default_demo_dir", lambda: demo_manifest.parent)
    monkeypatch.setattr(dryrun, "KAGGLE_SAMPLE_DIR", tmp_path / "not-on-kaggle")
    assert main(["dry-run", "--json", "--device", "cpu", "--workers", "0", "--no-embedding-check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["manifest"] == str(demo_manifest) and report["mean_cosine"] > report["fallback_mean_cosine"]
    assert main(["evaluate", str(sample_dir / "images"), "--prompts", str(sample_dir / "prompts.csv"),
                 "--manifest", "demo", "--json", "--device", "cpu", "--workers", "0", "--no-cache"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["ensemble"] == pytest.approx(report["mean_cosine"], abs=1e-6)
    assert set(evaluation["per_tower"]) == {"efficientnet_lite0_imagenet_phrases", "prior"}
    assert evaluation["per_tower"]["prior"] == pytest.approx(report["fallback_mean_cosine"], abs=1e-6)
    assert main(["validate-manifest", "demo"]) == 0
    listed = capsys.readouterr().out
    assert "efficientnet_lite0_imagenet_phrases: timm tf_efficientnet_lite0, retrieval by logits over 1000 bank rows" \
        in listed and "prior: prior (a constant vector), weight 0.5" in listed


def test_retrieval_tower_in_the_pipeline_equals_a_hand_computation(tmp_path, toy_manifest, sample_dir):
    """A timm classifier (rows = bank size) and a tiny open_clip embedding tower against random banks."""
    rng = np.random.default_rng(0)
    write_bank(tmp_path / "classes", [f"class {i}" for i in range(50)], rng.standard_normal((50, 384)))
    write_bank(tmp_path / "texts", [f"text {i}" for i in range(300)], rng.standard_normal((300, 384)),
               keys=rng.standard_normal((300, 32)))
    data = yaml.safe_load(toy_manifest.read_text())
    folder = toy_manifest.parent
    data["fallback"] = str(folder / data["fallback"])
    classifier = {"name": "cls", "kind": "retrieval", "library": "timm", "arch": "test_vit",
                  "checkpoint": str(tmp_path / "cls.safetensors"), "image": data["towers"][0]["image"],
                  "retrieval": {"bank": str(tmp_path / "classes"), "k": 5, "temperature": 0.7, "score": "logits"},
                  "weight": 1.0}
    clip = {"name": "clip", "kind": "retrieval", "library": "open_clip",
            "arch": str(folder / "tiny_open_clip_vit.json"), "checkpoint": str(tmp_path / "clip.safetensors"),
            "image": data["towers"][1]["image"],
            "retrieval": {"bank": str(tmp_path / "texts"), "k": 8, "temperature": 0.1, "score": "embedding"},
            "weight": 2.0}
    prior = {"name": "prior", "kind": "prior", "vector": str(folder / "fallback.npy"), "weight": 0.5}
    path = tmp_path / "retrieval.yaml"
    path.write_text(yaml.safe_dump({**data, "towers": [classifier, clip, prior]}))
    manifest = load_manifest(path, check_files=False)
    for spec in manifest.towers[:2]:
        torch.manual_seed(3)
        save_file({k: v.contiguous() for k, v in build_tower(spec).state_dict().items()}, str(spec.checkpoint))
    manifest = load_manifest(path)
    run = kaggle_i2p.run_prediction(sample_dir / "images", manifest, device="cpu", num_workers=0, progress=False)

    classes = np.asarray(Bank.open(tmp_path / "classes").targets, dtype=np.float64)
    texts = Bank.open(tmp_path / "texts")
    expected = []
    for image_id in run.ids:
        pixels = decode_image(sample_dir / "images" / f"{image_id}.png").unsqueeze(0)
        towers = []
        for spec in manifest.towers[:2]:
            model, views = load_tower(spec), []
            assert model.spec is spec and isinstance(model.head, RetrievalHead)  # the head holds the bank
            model.head = torch.nn.Identity()  # the raw scores, for this independent soft top-k
            for view in spec.views:
                with torch.no_grad():
                    scores = model(make_view(pixels, spec.image, view.resolution, hflip=view.flip))[0].double()
                if spec.retrieval.score == "logits":
                    values, rows = scores.topk(5)
                    bank_rows = classes[rows.numpy()]
                else:
                    keys = np.asarray(texts.keys, dtype=np.float64)
                    sims = keys @ (scores.numpy() / np.linalg.norm(scores.numpy()))
                    rows = np.argsort(-sims)[:8]
                    values, bank_rows = torch.from_numpy(sims[rows]), np.asarray(texts.targets, np.float64)[rows]
                weights = torch.softmax(values / spec.retrieval.temperature, 0).numpy()
                views.append(l2_normalize(weights @ bank_rows))
            towers.append(l2_normalize(np.mean(views, axis=0)))
        mixed = (1.0 * towers[0] + 2.0 * towers[1] + 0.5 * manifest.towers[2].vector) / 3.5
        expected.append(l2_normalize(mixed))
    np.testing.assert_allclose(run.embeddings, np.array(expected), atol=2e-5)
    np.testing.assert_array_equal(run.tower_embeddings["prior"], np.tile(manifest.towers[2].vector, (7, 1)))
    assert run.summary.n_views == 4 + 2  # the prior costs no forward pass


def test_manifest_errors_for_retrieval_and_prior(tmp_path, toy_manifest):
    write_bank(tmp_path / "small", ["a", "b"], np.ones((2, 16)))
    image = yaml.safe_load(toy_manifest.read_text())["towers"][0]["image"]
    data = {"fallback": str(toy_manifest.parent / "fallback.npy"), "towers": [
        {"name": "p", "kind": "prior", "weight": 1, "image": image},
        {"name": "r", "kind": "retrieval", "library": "timm", "arch": "test_vit", "checkpoint": "x.safetensors",
         "image": image, "weight": 1, "head": {"type": "linear"},
         "retrieval": {"bank": str(tmp_path / "small"), "k": 0, "temperature": -1, "score": "dot"}},
        {"name": "q", "kind": "retrieval", "library": "timm", "arch": "test_vit", "checkpoint": "x.safetensors",
         "image": image, "weight": 1},
        {"name": "z", "kind": "magic", "weight": 1},
    ]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as info:
        load_manifest(path, check_files=False)
    message = str(info.value)
    for fragment in ["tower 'p' (towers[0]).image: unknown key for a prior tower", "(towers[0]).vector: is required",
                     "(towers[1]).head: a retrieval tower has no head",
                     "(towers[1]).retrieval.k: 0 must be an integer >= 1",
                     "(towers[1]).retrieval.temperature: -1 must be a number > 0",
                     "(towers[1]).retrieval.score: 'dot' is not one of logits, embedding",
                     "small/targets.npy has shape (2, 16); expected (rows, 384)",
                     "(towers[2]).retrieval: is required", "(towers[3]).kind: 'magic' is not one of"]:
        assert fragment in message, fragment


def test_open_clip_cannot_give_logits(tmp_path, toy_manifest):
    write_bank(tmp_path / "b", ["a"], np.ones((1, 384)))
    data = yaml.safe_load(toy_manifest.read_text())
    tower = data["towers"][1]
    tower.update({"kind": "retrieval", "retrieval": {"bank": str(tmp_path / "b"), "score": "logits"}})
    tower.pop("head")
    tower["arch"] = str(toy_manifest.parent / tower["arch"])
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({**data, "fallback": str(toy_manifest.parent / "fallback.npy"), "towers": [tower]}))
    with pytest.raises(ManifestError, match="an open_clip image tower gives embeddings, not class logits"):
        check_architectures(load_manifest(path, check_files=False).towers)


def test_retrieval_towers_use_the_cache_and_a_changed_bank_invalidates_it(demo_manifest, tmp_path, sample_dir,
                                                                          monkeypatch):
    import os
    import shutil

    from kaggle_i2p.inference.predict import TowerRunner

    folder = tmp_path / "demo"
    shutil.copytree(demo_manifest.parent, folder)
    options = {"device": "cpu", "num_workers": 0, "progress": False, "cache_dir": tmp_path / "cache"}
    first = kaggle_i2p.run_prediction(sample_dir / "images", folder / "demo_manifest.yaml", **options)
    monkeypatch.setattr(TowerRunner, "forward_view", lambda *a: pytest.fail("recomputed"))
    second = kaggle_i2p.run_prediction(sample_dir / "images", folder / "demo_manifest.yaml", **options)
    assert second.summary.cached_images == 7 and np.array_equal(first.embeddings, second.embeddings)

    targets = folder / "imagenet_phrases" / "targets.npy"
    os.utime(targets, ns=(targets.stat().st_atime_ns, targets.stat().st_mtime_ns + 10**9))  # touched, not changed:
    kaggle_i2p.run_prediction(sample_dir / "images", folder / "demo_manifest.yaml", **options)  # the cache holds
    stat = targets.stat()
    changed = np.load(targets)
    np.save(targets, changed[::-1].copy())  # the bank changed (same size, the time set back): known by content
    os.utime(targets, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        kaggle_i2p.run_prediction(sample_dir / "images", folder / "demo_manifest.yaml", **options)


def test_a_bank_searching_tower_caches_its_queries_and_searches_once_per_run(tmp_path, sample_dir, monkeypatch):
    """The forward passes store queries; the bank is searched once for every image and view together; a new k
    reuses the cached queries and gives the bytes of an uncached run."""
    from kaggle_i2p.bank import folder as retrieval
    from kaggle_i2p.inference.predict import TowerRunner
    from kaggle_i2p.manifest import kind_of

    first = build_clip_retrieval(tmp_path, {"k": 8, "temperature": 0.1, "score": "embedding"})
    spec = load_manifest(first).towers[0]
    assert spec.forward_dim() == 32 and kind_of(spec).has_step_after_encoding(spec)
    calls = []
    original = retrieval.nearest
    monkeypatch.setattr(retrieval, "nearest", lambda q, *a, **kw: calls.append(len(q)) or original(q, *a, **kw))
    options = {"device": "cpu", "num_workers": 0, "progress": False, "cache_dir": tmp_path / "cache"}
    run = kaggle_i2p.run_prediction(sample_dir / "images", first, **options)
    assert spec.n_views == 4 and calls == [7 * 4]  # one search: 7 images x 2 resolutions x 2 flips
    assert set(run.view_outputs["clip"]) == {v.name for v in spec.views}
    assert all(v.shape == (7, 384) for v in run.view_outputs["clip"].values())  # embeddings, as for any tower

    second = build_clip_retrieval(tmp_path, {"k": 3, "temperature": 0.1, "score": "embedding"}, "k3.yaml")
    monkeypatch.setattr(TowerRunner, "forward_view", lambda *a: pytest.fail("recomputed"))
    cached = kaggle_i2p.run_prediction(sample_dir / "images", second, **options)
    assert cached.summary.cached_images == 7 and not np.array_equal(cached.embeddings, run.embeddings)
    monkeypatch.undo()
    fresh = kaggle_i2p.run_prediction(sample_dir / "images", second, device="cpu", num_workers=0, progress=False)
    assert np.array_equal(fresh.embeddings, cached.embeddings)
