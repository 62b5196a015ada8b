"""Tower building and checkpoint loading: formats, prefixes, strict keys with a readable diff, checksums, resizing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from kaggle_i2p.core.fileio import sha256_file
from kaggle_i2p.kinds.regressor import HeadSpec, build_head
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.models.checkpoints import strip_prefixes
from kaggle_i2p.models.towers import TowerLoadError, build_tower, load_tower


@pytest.fixture
def specs(toy_manifest):
    manifest = load_manifest(toy_manifest)
    return {t.name: t for t in manifest.towers}


def _reference_output(spec, images):
    tower = build_tower(spec).eval()
    tower.load_state_dict(load_file(str(spec.checkpoint)))
    with torch.no_grad():
        return tower(images)


def test_loaded_tower_reproduces_the_checkpoint(specs):
    images = torch.randn(2, 3, 64, 64)
    for spec in specs.values():
        tower = load_tower(spec)
        assert not tower.training and not any(p.requires_grad for p in tower.parameters())
        with torch.no_grad():
            out = tower(images)
        assert out.shape == (2, 384)
        torch.testing.assert_close(out, _reference_output(spec, images), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_compile_and_ddp_prefixes_are_stripped(tmp_path, specs, prefix):
    spec = specs["toy_timm_vit"]
    state = load_file(str(spec.checkpoint))
    path = tmp_path / "prefixed.safetensors"
    save_file({prefix + k: v for k, v in state.items()}, str(path))
    tower = load_tower(dataclasses.replace(spec, checkpoint=path))
    torch.testing.assert_close(tower.state_dict()["head.0.weight"], state["head.0.weight"], rtol=0, atol=0)


def test_strip_prefixes_keeps_inner_names():
    state = {"module.backbone._orig_mod.blocks.0.w": 1, "backbone.module_list.w": 2}
    assert strip_prefixes(state) == {"backbone.blocks.0.w": 1, "backbone.module_list.w": 2}


def test_legacy_torch_checkpoint_with_wrapper(tmp_path, specs):
    spec = specs["toy_open_clip_vit"]
    state = load_file(str(spec.checkpoint))
    path = tmp_path / "legacy.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = load_tower(dataclasses.replace(spec, checkpoint=path))(images)
    torch.testing.assert_close(out, _reference_output(spec, images), rtol=0, atol=0)


def test_mismatched_checkpoint_gives_readable_diff(tmp_path, specs):
    spec = specs["toy_timm_vit"]
    state = load_file(str(spec.checkpoint))
    state.pop("head.3.bias")
    state["head.extra.weight"] = torch.zeros(1)
    state["head.0.weight"] = torch.zeros(7, 7)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(TowerLoadError) as info:
        load_tower(dataclasses.replace(spec, checkpoint=path))
    message = str(info.value)
    assert f"tower 'toy_timm_vit': checkpoint {path} does not match timm test_vit + mlp head" in message
    assert "1 missing key(s): head.3.bias" in message
    assert "1 unexpected key(s): head.extra.weight" in message
    assert "shape mismatch head.0.weight: checkpoint (7, 7), model (48, 64)" in message


def test_foreign_keys_get_a_hint(tmp_path, specs):
    spec = specs["toy_timm_vit"]
    canonical = load_file(str(spec.checkpoint))
    renamed = {k.replace("backbone.", "visual.").replace("head.", "w_out."): v for k, v in canonical.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))  # a head under a name of its own: found by its keys
    loaded = load_tower(dataclasses.replace(spec, checkpoint=tmp_path / "renamed.safetensors")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in canonical.items())
    foreign = {k.replace("blocks.", "layers."): v for k, v in renamed.items()}  # no layout knows `layers.`
    save_file(foreign, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(TowerLoadError, match="hint: tower checkpoints hold the keys of kaggle_i2p.models.towers.Tower"):
        load_tower(dataclasses.replace(spec, checkpoint=tmp_path / "foreign.safetensors"))


def test_sha256_is_checked(specs):
    spec = specs["toy_timm_vit"]
    good = sha256_file(spec.checkpoint)
    load_tower(dataclasses.replace(spec, sha256=good))
    with pytest.raises(TowerLoadError, match=f"has sha256 {good}, manifest says 0{{64}}"):
        load_tower(dataclasses.replace(spec, sha256="0" * 64))


def test_unreadable_checkpoint(tmp_path, specs):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(TowerLoadError, match="cannot read checkpoint"):
        load_tower(dataclasses.replace(specs["toy_timm_vit"], checkpoint=path))


def test_open_clip_runs_other_sizes_through_open_clip_resize_pos_embed(specs):
    """At 80 px our tower must equal an open_clip tower built for 80 px and loaded through open_clip's resizing."""
    from open_clip.model import resize_pos_embed

    spec = specs["toy_open_clip_vit"]
    tower = load_tower(spec)
    images = torch.randn(2, 3, 80, 80)
    native_pos = tower.backbone.positional_embedding.clone()
    with torch.no_grad():
        ours = tower(images)
    assert torch.equal(tower.backbone.positional_embedding, native_pos)  # the stored parameter is untouched

    big = build_tower(dataclasses.replace(spec, native_resolution=80)).eval()
    state = {("visual." + k[len("backbone."):] if k.startswith("backbone.") else k): v
             for k, v in load_file(str(spec.checkpoint)).items()}
    holder = torch.nn.Module()
    holder.visual = big.backbone
    resize_pos_embed(state, holder)
    big.load_state_dict({("backbone." + k[len("visual."):] if k.startswith("visual.") else k): v
                         for k, v in state.items()})
    with torch.no_grad():
        theirs = big(images)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # and the native size still uses the native embedding (last-bit kernel differences only)
        torch.testing.assert_close(tower(torch.zeros(1, 3, 64, 64)),
                                   _reference_output(spec, torch.zeros(1, 3, 64, 64)), rtol=0, atol=1e-6)


def test_timm_vit_resamples_position_embeddings_dynamically(specs):
    tower = load_tower(specs["toy_timm_vit"])
    with torch.no_grad():
        out = tower(torch.randn(1, 3, 96, 96))
    assert out.shape == (1, 384) and torch.isfinite(out).all()


def test_heads():
    linear = build_head(10, HeadSpec("linear"), 384)
    assert isinstance(linear, torch.nn.Linear) and linear.out_features == 384
    mlp = build_head(10, HeadSpec("mlp", hidden=20, norm="layernorm", activation="gelu"), 384)
    assert [type(m).__name__ for m in mlp] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert mlp(torch.zeros(3, 10)).shape == (3, 384)
    bn = build_head(10, HeadSpec("mlp", hidden=20), 384)
    assert [type(m).__name__ for m in bn] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_fp16_checkpoint_loads_into_fp32_weights(tmp_path, specs):
    spec = specs["toy_open_clip_vit"]
    state = load_file(str(spec.checkpoint))
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(path))
    tower = load_tower(dataclasses.replace(spec, checkpoint=path))
    assert all(p.dtype == torch.float32 for p in tower.parameters())
    torch.testing.assert_close(tower.state_dict()["head.weight"], state["head.weight"].half().float(), rtol=0, atol=0)


def test_constructor_only_buffers_fall_back_to_a_normal_build(tmp_path, specs, monkeypatch):
    """A tower with a non-persistent buffer (like EVA's rotary tables) must not keep it on the meta device."""
    from kaggle_i2p.models import towers

    spec = specs["toy_timm_vit"]
    real_build = towers.build_tower

    def with_table(*args, **kwargs):
        tower = real_build(*args, **kwargs)
        tower.backbone.register_buffer("table", torch.arange(4.0), persistent=False)
        return tower

    monkeypatch.setattr(towers, "build_tower", with_table)
    tower = load_tower(spec)
    assert torch.equal(tower.backbone.table, torch.arange(4.0))
    assert not any(t.is_meta for t in (*tower.parameters(), *tower.buffers()))
    with torch.no_grad():
        torch.testing.assert_close(tower(torch.zeros(1, 3, 64, 64)), _reference_output(spec, torch.zeros(1, 3, 64, 64)),
                                   rtol=0, atol=0)


def test_heads_without_bias_and_deeper_mlps_serve_their_own_forward(tmp_path, sample_dir):
    """`bias: false` (the output Linear without a bias, as the 5th place's heads) and `hidden: [a, b]` (a deeper MLP)
    load a checkpoint saved by plain torch modules of that shape, and predict that module's own outputs."""
    import numpy as np
    import yaml
    from safetensors.torch import save_file

    import kaggle_i2p
    from kaggle_i2p.core.ensemble import combine_views
    from kaggle_i2p.inference.images import decode_image, make_view
    from kaggle_i2p.testing import tiny_tower_manifest

    for head, keys, absent in [({"type": "linear", "bias": False}, {"head.weight"}, "head.bias"),
                               ({"type": "mlp", "hidden": [24, 12], "norm": "layernorm", "activation": "gelu",
                                 "bias": False}, {"head.0.bias", "head.3.weight", "head.3.bias", "head.6.weight"},
                                "head.6.bias")]:
        folder = tmp_path / head["type"]
        path = tiny_tower_manifest(folder, "timm", "regressor")
        data = yaml.safe_load(path.read_text())
        data["towers"][0]["head"] = head
        path.write_text(yaml.safe_dump(data))
        spec = load_manifest(path, check_files=False).towers[0]
        assert spec.to_dict()["head"] == head
        torch.manual_seed(1)
        tower = build_tower(spec)
        state = {k: v.contiguous() for k, v in tower.state_dict().items()}
        assert keys <= set(state) and absent not in state  # the output Linear has no bias
        save_file(state, str(spec.checkpoint))
        run = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False)
        pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in run.ids]
        with torch.no_grad():
            views = [tower.eval()(make_view(pixels, spec.image, v.resolution, v.flip)).numpy() for v in spec.views]
        np.testing.assert_allclose(run.embeddings, combine_views(views), atol=2e-5)
        assert np.dot(run.embeddings[0], run.embeddings[1]) < 0.9999  # the image decides the output
