"""Checkpoints as other people's code saves them (issue 23, step 3): Lightning `.ckpt`, wrapper dicts and DDP
prefixes, a bare timm model whose classifier is the head, open_clip's whole CLIP file, and names only the entry's
`checkpoint_keys` can map; each served and compared with the model's own forward, and a mismatch names its fix."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.ensemble import combine_views
from kaggle_i2p.inference.images import decode_image, make_view
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.towers import build_tower, load_tower
from kaggle_i2p.testing import tiny_tower_manifest


def _serve(path, sample_dir) -> np.ndarray:
    return kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                     batch_size=4).embeddings


def _own_forward(model, spec, sample_dir, ids) -> np.ndarray:
    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in ids]
    with torch.no_grad():
        views = [model.eval()(make_view(pixels, spec.image, v.resolution, v.flip)).numpy() for v in spec.views]
    return combine_views(views, spec.view_weight_list())


def _with(path, checkpoint: str, **entry) -> None:
    data = yaml.safe_load(path.read_text())
    data["towers"][0].update(checkpoint=checkpoint, **entry)
    data["towers"][0].pop("sha256", None)
    path.write_text(yaml.safe_dump(data))


@pytest.fixture
def tiny(tmp_path, sample_dir):
    """A tiny timm regressor (linear head), its canonical checkpoint, and what serving it gives."""
    path = tiny_tower_manifest(tmp_path, "timm", "regressor")
    data = yaml.safe_load(path.read_text())
    data["towers"][0]["head"] = {"type": "linear"}
    path.write_text(yaml.safe_dump(data))
    spec = load_manifest(path, check_files=False).towers[0]
    torch.manual_seed(2)
    tower = build_tower(spec)
    state = {k: v.contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(spec.checkpoint))
    return path, state, _serve(path, sample_dir)


def test_lightning_ckpt_and_wrapped_ddp_files_are_read_as_saved(tiny, tmp_path, sample_dir):
    path, state, canonical = tiny
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3, "global_step": 120},
               tmp_path / "lightning.ckpt")
    torch.save({"model_ema": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, tmp_path / "ddp.pth")
    for name in ("lightning.ckpt", "ddp.pth"):
        _with(path, name)
        assert main(["validate-manifest", "--deep", str(path)]) == 0
        np.testing.assert_array_equal(_serve(path, sample_dir), canonical)


def test_a_bare_timm_model_with_its_classifier_as_the_head(tiny, tmp_path, sample_dir):
    """A public timm trainer: timm.create_model(arch, num_classes=384), its state_dict saved as it is."""
    path, _, _ = tiny
    spec = load_manifest(path, check_files=False).towers[0]
    torch.manual_seed(5)
    model = timm.create_model("test_vit", pretrained=False, num_classes=384, dynamic_img_size=True)
    with torch.no_grad():
        model.cls_token.zero_()  # the pooled token must come from the image, not a constant
        model.pos_embed[:, 0].zero_()
    torch.save(model.state_dict(), tmp_path / "timm_model.pth")
    _with(path, "timm_model.pth")
    got = _serve(path, sample_dir)
    want = _own_forward(model, spec, sample_dir, sorted(p.stem for p in (sample_dir / "images").iterdir()))
    assert (np.sum(got * want, axis=1) >= 0.9999).all()
    assert np.dot(got[0], got[1]) < 0.9999


def test_open_clips_whole_clip_file_serves_its_visual_tower(tmp_path, sample_dir):
    """A retrieval tower from an open_clip CLIP file (text-side tensors beside `visual.*`), as open_clip saves it."""
    path = tiny_tower_manifest(tmp_path, "open_clip", "retrieval")
    canonical = _serve(path, sample_dir)
    spec = load_manifest(path).towers[0]
    tower = load_tower(spec)
    whole = {f"visual.{k}": v for k, v in tower.backbone.state_dict().items()}
    whole.update({"token_embedding.weight": torch.zeros(10, 4), "text_projection": torch.zeros(4, 4),
                  "logit_scale": torch.ones(())})
    torch.save(whole, tmp_path / "clip.pt")
    _with(path, "clip.pt")
    np.testing.assert_array_equal(_serve(path, sample_dir), canonical)


def test_checkpoint_keys_map_what_no_layout_knows_and_a_mismatch_names_the_fix(tiny, tmp_path, sample_dir, capsys):
    path, state, canonical = tiny
    own = {**{f"encoder.{k[len('backbone.'):]}": v for k, v in state.items() if k.startswith("backbone.")},
           **{f"w_head.{k[len('head.'):]}": v for k, v in state.items() if k.startswith("head.")},
           "aux.weight": torch.ones(3)}
    save_file(own, str(tmp_path / "own.safetensors"))
    _with(path, "own.safetensors",
          checkpoint_keys={"strip": ["encoder."], "rename": {"w_head.": "head."}, "ignore": ["aux."]})
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    np.testing.assert_array_equal(_serve(path, sample_dir), canonical)
    assert load_manifest(path).towers[0].to_dict()["checkpoint_keys"] == {
        "strip": ["encoder."], "rename": {"w_head.": "head."}, "ignore": ["aux."]}

    renamed = {k.replace("head.", "head.0.") if k.startswith("head.") else k: v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "sequential.safetensors"))  # the head inside an nn.Sequential
    _with(path, "sequential.safetensors", checkpoint_keys=None)
    data = yaml.safe_load(path.read_text())
    data["towers"][0].pop("checkpoint_keys")
    path.write_text(yaml.safe_dump(data))
    assert main(["validate-manifest", "--deep", str(path)]) == 2
    assert "fix: add `checkpoint_keys: {rename: {'head.0.': 'head.'}}` to the tower's entry" in capsys.readouterr().err


def test_a_head_under_its_own_name_is_found_by_its_keys(tiny, tmp_path, sample_dir):
    """`dense0.`, `linear.`, `w_head.`: the keys beside the backbone that are exactly the head's are the head."""
    path, state, canonical = tiny
    for name in ("dense0", "linear", "w_head"):
        saved = {k.replace("head.", f"{name}.", 1) if k.startswith("head.") else k[len("backbone."):]: v
                 for k, v in state.items()}  # a bare backbone beside its head
        save_file(saved, str(tmp_path / f"{name}.safetensors"))
        _with(path, f"{name}.safetensors")
        np.testing.assert_array_equal(_serve(path, sample_dir), canonical)


def test_the_cache_key_is_the_same_however_the_weights_were_wrapped(tiny, tmp_path, sample_dir):
    """Lightning, DDP in a wrapper dict, a bare backbone + fc, checkpoint_keys, and the tower's own file: one key, so
    a cache made from one serves the others; other weights give another key; what was left out is in the summary."""
    from kaggle_i2p.inference.cache import PredictionCache

    path, state, canonical = tiny
    cache = PredictionCache(tmp_path / "cache")
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 1}, tmp_path / "a.ckpt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "b.pth")
    save_file({k.replace("head.", "fc.", 1) if k.startswith("head.") else k[len("backbone."):]: v
               for k, v in state.items()}, str(tmp_path / "c.safetensors"))
    save_file({**{f"enc.{k}": v for k, v in state.items()}, "aux.scale": torch.ones(2)},
              str(tmp_path / "d.safetensors"))
    keys = {}
    for name, rules in (("tiny.safetensors", None), ("a.ckpt", None), ("b.pth", None), ("c.safetensors", None),
                        ("d.safetensors", {"strip": ["enc."], "ignore": ["aux."]})):
        _with(path, name, **({"checkpoint_keys": rules} if rules else {}))
        spec = load_manifest(path).towers[0]
        keys[name] = cache.tower_key(spec, "fp32", 384, 4)
    assert len(set(keys.values())) == 1, keys
    run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                    batch_size=4, cache_dir=tmp_path / "cache")
    assert run.summary.cached_images == 0 and run.summary.keys_left_out == {"tiny": 1}
    assert "1 checkpoint key(s) left out (tiny 1)" in str(run.summary)
    _with(path, "a.ckpt")
    data = yaml.safe_load(path.read_text())
    data["towers"][0].pop("checkpoint_keys")
    path.write_text(yaml.safe_dump(data))
    again = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                      batch_size=4, cache_dir=tmp_path / "cache")
    assert again.summary.cached_images == len(again.ids)  # d.safetensors' cache serves the Lightning file
    np.testing.assert_array_equal(again.embeddings, canonical)
    other = {k: v + 0.01 if k.startswith("head.") else v for k, v in state.items()}
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.items()}}, tmp_path / "e.ckpt")
    _with(path, "e.ckpt")
    assert cache.tower_key(load_manifest(path).towers[0], "fp32", 384, 4) != keys["a.ckpt"]
