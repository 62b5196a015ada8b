"""HF transformers towers (issue 23): each family built tiny from its own config class with random weights, saved the
way its users' code saves it, served through a manifest, and compared with the model's own forward on our views
(cosine >= 0.9999 per image, and not the same vector for every image); BLIP-2 and CLIP with multi-resolution TTA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as hf
import yaml
from torch import nn

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.ensemble import combine_views
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.inference.images import decode_image, make_view
from kaggle_i2p.manifest import load_manifest
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD, tiny_hf_config, write_tiny_hf_model


def _config(family: str):
    data = tiny_hf_config(family)
    return hf.CONFIG_MAPPING[data["model_type"]].from_dict(data)


class UserTower(nn.Module):
    """What HF users wrote: the model as an attribute, a Linear head beside it, a forward of their own."""

    def __init__(self, model: nn.Module, width: int, features, attribute: str = "vision", head: str = "fc"):
        super().__init__()
        self._attribute, self._head, self._features = attribute, head, features
        self.add_module(attribute, model)
        self.add_module(head, nn.Linear(width, 384))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._head)(self._features(getattr(self, self._attribute), images))


def _pooled(model, images):
    return model(pixel_values=images, interpolate_pos_encoding=True).pooler_output


def _projected(model, images):
    return model(pixel_values=images, interpolate_pos_encoding=True).image_embeds


def _queries(model, images):  # BLIP-2's own Q-Former features, the queries' mean (the 1st place's tower)
    return model.get_qformer_features(pixel_values=images, interpolate_pos_encoding=True).mean(dim=1)


def _plain_pooled(model, images):  # models that interpolate by themselves or need no positions
    return model(pixel_values=images).pooler_output


def _manifest(folder, family: str, checkpoint: str, resolutions, **entry) -> object:
    arch = write_tiny_hf_model(folder / f"hf_{family}", family)
    (folder / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    tower = {"name": family, "library": "transformers", "arch": arch.name, "checkpoint": checkpoint,
             "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                       "resolutions": list(resolutions)},
             "weight": 1.0, **entry}
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": [tower]}))
    return path


def _serve(path, sample_dir) -> np.ndarray:
    return kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                     batch_size=4).embeddings


def _own(model, spec, sample_dir) -> np.ndarray:
    ids = sorted(p.stem for p in (sample_dir / "images").iterdir())
    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in ids]
    with torch.no_grad():
        views = [model.eval()(make_view(pixels, spec.image, v.resolution, v.flip)).numpy() for v in spec.views]
    return combine_views(views, spec.view_weight_list())


def _assert_serves_as_own_forward(path, model, sample_dir):
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    got = _serve(path, sample_dir)
    want = _own(model, load_manifest(path).towers[0], sample_dir)
    assert (np.sum(got * want, axis=1) >= 0.9999).all(), np.sum(got * want, axis=1)
    assert np.dot(got[0], got[1]) < 0.999, "every image gave the same vector: the test would prove nothing"


class _Features(nn.Module):
    """CLIPModel's own image features (`get_image_features`), as a module."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=images)
        return out if torch.is_tensor(out) else out.pooler_output


FAMILIES = [  # family, the model class users built, its width, their features function, the entry's features
    ("clip_vision", hf.CLIPVisionModel, 32, _pooled, None),
    ("clip_vision", hf.CLIPVisionModelWithProjection, 24, _projected, "image_embeds"),
    ("siglip", hf.SiglipVisionModel, 32, _pooled, None),
    ("vit", hf.ViTModel, 32, _pooled, None),
    ("dinov2", hf.Dinov2Model, 32, _plain_pooled, None),
    ("convnext", hf.ConvNextModel, 32, _plain_pooled, None),
    ("swin", hf.SwinModel, 16, _plain_pooled, None),
]


@pytest.mark.parametrize(("family", "cls", "width", "features", "entry_features"), FAMILIES,
                         ids=[f"{f[0]}-{f[1].__name__}" for f in FAMILIES])
def test_an_hf_image_model_with_a_head_serves_as_its_own_forward(family, cls, width, features, entry_features,
                                                                 tmp_path, sample_dir):
    torch.manual_seed(3)
    model = cls(_config(family))
    user = UserTower(model, width, features)
    torch.save(user.state_dict(), tmp_path / "user.pth")  # keys vision.*, fc.*: found by themselves
    entry = {"features": entry_features} if entry_features else {}
    path = _manifest(tmp_path, family, "user.pth", [64], **entry)
    _assert_serves_as_own_forward(path, user, sample_dir)


def test_hf_clip_runs_multi_resolution_tta_from_a_transformers_4_file(tmp_path, sample_dir):
    """`CLIPVisionModel` saved by transformers 4 (its keys under `vision_model.`), inside a module as `clip`."""
    torch.manual_seed(4)
    user = UserTower(hf.CLIPVisionModel(_config("clip_vision")), 32, _pooled, attribute="clip", head="head")
    state = {k.replace("clip.", "clip.vision_model.", 1) if k.startswith("clip.") else k: v
             for k, v in user.state_dict().items()}
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 2}, tmp_path / "clip.ckpt")
    path = _manifest(tmp_path, "clip_vision", "clip.ckpt", [64, 96, 112])
    _assert_serves_as_own_forward(path, user, sample_dir)


def test_blip2_vision_and_qformer_serve_with_multi_resolution_tta(tmp_path, sample_dir):
    """The 1st place's third tower: BLIP-2's vision model and Q-Former, the queries' mean into a Linear head, its
    file the whole Blip2Model (language model too) beside the head."""
    torch.manual_seed(5)
    blip = hf.Blip2Model(_config("blip2"))
    user = UserTower(blip, 32, _queries, attribute="blip", head="head")
    torch.save(user.state_dict(), tmp_path / "blip2.pth")
    path = _manifest(tmp_path, "blip2", "blip2.pth", [64, 80])
    _assert_serves_as_own_forward(path, user, sample_dir)
    assert load_manifest(path).towers[0].views[1].resolution == 80


def test_a_whole_hf_clip_file_serves_a_retrieval_tower(tmp_path, sample_dir):
    """CLIPModel.save_pretrained's weights (text tower, logit scale) as a retrieval tower's image side."""
    from kaggle_i2p.testing import synthetic_bank

    torch.manual_seed(6)
    clip = hf.CLIPModel(_config("clip"))
    torch.save(clip.state_dict(), tmp_path / "clip.bin")
    synthetic_bank(tmp_path / "bank", rows=30, key_dim=24)
    path = _manifest(tmp_path, "clip", "clip.bin", [64], kind="retrieval", features="image_embeds",
                     retrieval={"bank": "bank", "k": 30, "temperature": 0.05, "score": "embedding"})
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    got = _serve(path, sample_dir)
    spec = load_manifest(path).towers[0]
    queries = _own(_Features(clip), spec, sample_dir)
    from kaggle_i2p.bank.folder import Bank, retrieve

    want = retrieve(queries, Bank.open(tmp_path / "bank"), k=30, temperature=0.05)
    assert (np.sum(got * want, axis=1) >= 0.9999).all()
    assert np.dot(got[0], got[1]) < 0.999


def test_an_hf_arch_is_a_local_config_and_bad_choices_name_their_field(tmp_path, capsys):
    torch.save({}, tmp_path / "x.pth")
    path = _manifest(tmp_path, "vit", "x.pth", [64], features="query_mean")
    assert main(["validate-manifest", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tower 'vit' (towers[0]).features: query_mean is BLIP-2's" in err
    data = yaml.safe_load(path.read_text())
    data["towers"][0].update(arch="openai/clip-vit-base-patch32", features="logits")
    path.write_text(yaml.safe_dump(data))
    assert main(["validate-manifest", str(path)]) == 2
    err = capsys.readouterr().err
    assert "towers[0]).arch: file not found" in err
    assert "towers[0]).features: 'logits' is not what a transformers backbone gives" in err
    # a folder and its config.json are the same arch, and the cache hashes the config's content
    spec = load_manifest(_manifest(tmp_path / "b", "vit", "x.pth", [64]), check_files=False).towers[0]
    assert spec.arch.endswith("config.json")
    from kaggle_i2p.models.backbones import library

    assert library("transformers").arch_identity(spec.arch) == json.loads((tmp_path / "b" / "hf_vit" /
                                                                           "config.json").read_text())


def test_a_vit_saved_by_save_pretrained_keeps_its_older_key_names_and_is_read(tmp_path, sample_dir):
    """transformers 5's ViT names its keys `attention.k_proj`; save_pretrained (and transformers 4) write
    `attention.attention.key`: the library reads them through transformers' own renamings."""
    config = _config("vit")
    torch.manual_seed(0)
    model = hf.ViTModel(config).eval()
    model.save_pretrained(str(tmp_path / "hf_vit"))
    from safetensors import safe_open

    assert any(".attention.attention.key." in k for k in safe_open(str(tmp_path / "hf_vit" / "model.safetensors"),
                                                                      "pt").keys())
    head = nn.Linear(config.hidden_size, 384)
    torch.save({f"fc.{k}": v for k, v in head.state_dict().items()}, tmp_path / "head.pth")
    from safetensors.torch import load_file

    state = {**load_file(str(tmp_path / "hf_vit" / "model.safetensors")),
             **{f"fc.{k}": v for k, v in head.state_dict().items()}}
    torch.save(state, tmp_path / "tower.pth")
    path = _manifest(tmp_path, "vit", "tower.pth", [64], features="pooled")
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    got = _serve(path, sample_dir)
    spec = load_manifest(path).towers[0]
    ids = sorted(p.stem for p in (sample_dir / "images").iterdir())
    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in ids]
    with torch.no_grad():
        want = head(model(pixel_values=make_view(pixels, spec.image, 64)).pooler_output).numpy()
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert (np.sum(got * want, axis=1) >= 0.9999).all()
