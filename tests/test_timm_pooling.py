"""timm towers pooled and fed as their trainers did (issue 23, step 4): the 5th place's EVA02 (the class token beside
the mean of the patch tokens, with and without the final norm, a bias-free head), a class-token tower, and the 111th
place's ViT whose classifier's logits feed the head; each built tiny, saved as its own code saves it, served through
a manifest with multi-resolution TTA and compared with its own forward (cosine >= 0.9999 per image, not constant)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import yaml
from torch import nn

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD, assert_served_as_own_forward

EVA = "eva02_tiny_patch14_224"


class EvaClsMean(nn.Module):
    """The 5th place's EVA02 tower: forward_features, then CLS ⊕ mean(patches) into Linear(2C, 384, bias=False)."""

    def __init__(self, global_pool: str = "avg"):
        super().__init__()
        self.backbone = timm.create_model(EVA, pretrained=False, num_classes=0, depth=2, global_pool=global_pool,
                                          dynamic_img_size=True)
        self.head = nn.Linear(2 * self.backbone.embed_dim, 384, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)
        return self.head(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1))


class EvaCls(nn.Module):
    """A class-token tower: timm's own token pooling after the final norm, then a Linear head."""

    def __init__(self):
        super().__init__()
        self.model = timm.create_model(EVA, pretrained=False, num_classes=0, depth=2, global_pool="token",
                                       dynamic_img_size=True)
        self.fc = nn.Linear(self.model.embed_dim, 384)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.model(images))


class VitLogits(nn.Module):
    """The 111th place's ViT: the classifier kept, its logits into Linear(classes, 384)."""

    def __init__(self):
        super().__init__()
        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100, depth=2,
                                     dynamic_img_size=True)
        self.fc = nn.Linear(100, 384)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.vit(images))


def _image_dependent(model: nn.Module) -> nn.Module:
    """The class token and its position zeroed, so a random tower's pooled token comes from the image."""
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "cls_token") and isinstance(getattr(module, "pos_embed", None), nn.Parameter):
            with torch.no_grad():
                module.cls_token.zero_()
                module.pos_embed[:, 0].zero_()
    return model.eval()


def _manifest(folder, arch: str, checkpoint: str, resolutions, **entry):
    (folder / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    tower = {"name": "user", "library": "timm", "arch": arch, "checkpoint": checkpoint,
             "image": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize": "squash",
                       "resolutions": list(resolutions)}, "weight": 1.0, **entry}
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": [tower]}))
    return path


def _check(model: nn.Module, path, sample_dir) -> np.ndarray:
    """The deep check passes; the served vectors are the model's own forward, and depend on the image."""
    assert main(["validate-manifest", "--deep", str(path)]) == 0
    return assert_served_as_own_forward(model, path, sample_dir / "images", batch_size=4)


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_eva02_cls_mean_without_its_final_norm(tmp_path, sample_dir, global_pool):
    """Built with avg pooling (its `fc_norm` in the file but never applied) or with token pooling and its `norm`
    replaced by Identity: either way the entry is `global_pool: cls_mean, final_norm: false`."""
    model = EvaClsMean(global_pool)
    if global_pool == "token":
        model.backbone.norm = nn.Identity()
    model = _image_dependent(model)
    torch.save(model.state_dict(), tmp_path / "eva.pth")
    path = _manifest(tmp_path, EVA, "eva.pth", [112, 140], head={"type": "linear", "bias": False},
                     backbone={"global_pool": "cls_mean", "final_norm": False, "model_kwargs": {"depth": 2}})
    _check(model, path, sample_dir)


def test_eva02_cls_mean_after_its_final_norm_is_another_tower(tmp_path, sample_dir):
    model = _image_dependent(EvaClsMean("token"))  # forward_features ends in the final norm
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "eva.ckpt")
    path = _manifest(tmp_path, EVA, "eva.ckpt", [112], head={"type": "linear", "bias": False},
                     backbone={"global_pool": "cls_mean", "model_kwargs": {"depth": 2}})
    with_norm = _check(model, path, sample_dir)
    data = yaml.safe_load(path.read_text())
    data["towers"][0]["backbone"]["final_norm"] = False
    path.write_text(yaml.safe_dump(data))
    without = kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                        batch_size=4).embeddings
    assert np.sum(with_norm * without, axis=1).max() < 0.999  # the norm is not a detail: it must match training


def test_a_class_token_tower(tmp_path, sample_dir):
    model = _image_dependent(EvaCls())
    torch.save(model.state_dict(), tmp_path / "cls.pth")
    path = _manifest(tmp_path, EVA, "cls.pth", [112, 168], head={"type": "linear"},
                     backbone={"global_pool": "token", "model_kwargs": {"depth": 2}})
    _check(model, path, sample_dir)


def test_a_vit_whose_logits_feed_the_head(tmp_path, sample_dir):
    model = _image_dependent(VitLogits())
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    path = _manifest(tmp_path, "vit_tiny_patch16_224", "vit.pth", [64, 96], head={"type": "linear"},
                     features="logits", backbone={"num_classes": 100, "model_kwargs": {"depth": 2}})
    _check(model, path, sample_dir)


@pytest.mark.parametrize(("entry", "field", "message"), [
    ({"backbone": {"global_pool": "cls_mean"}, "arch": "resnet18"}, "backbone.global_pool", "has no tokens"),
    ({"backbone": {"model_kwargs": {"num_classes": 3}}}, "backbone.model_kwargs", "set by the entry's own fields"),
    ({"backbone": {"num_classes": 0}, "features": "logits"}, "backbone.num_classes", "positive integer"),
    ({"backbone": {"final_norm": "no"}}, "backbone.final_norm", ""),
    ({"features": "tokens"}, "features", "pooled"),
])
def test_pooling_options_that_cannot_work_are_one_message(tmp_path, capsys, entry, field, message):
    entry = dict(entry)
    arch = entry.pop("arch", EVA)
    torch.save({}, tmp_path / "none.pth")
    path = _manifest(tmp_path, arch, "none.pth", [112], head={"type": "linear"}, **entry)
    assert main(["validate-manifest", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"(towers[0]).{field}:" in err and message in err and "Traceback" not in err
