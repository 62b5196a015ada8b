"""`kaggle-i2p inspect` (issue 23): each family built tiny with random weights and saved as its own code saves it;
inspect, which reads only keys and shapes, proposes the entry, `--append` adds it to a manifest after the deep check,
and the served vectors equal the model's own forward (cosine >= 0.9999 per image, not constant). Files it cannot
read as a tower are one message naming what it found and what to pass."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import transformers as hf
import yaml
from torch import nn

from kaggle_i2p.cli import main
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.models.recognise import head_guesses, inspect_checkpoint
from kaggle_i2p.testing import TINY_OPEN_CLIP_CONFIG, assert_served_as_own_forward, tiny_hf_config

EVA = "eva02_tiny_patch14_224"


def _image_dependent(model: nn.Module) -> nn.Module:
    """Class tokens and their positions zeroed, so a random tower's pooled token comes from the image."""
    torch.manual_seed(0)
    for module in model.modules():
        for name in ("cls_token", "class_embedding"):
            token = getattr(module, name, None)
            if isinstance(token, nn.Parameter):
                with torch.no_grad():
                    token.zero_()
    return model.eval()


class Wrapped(nn.Module):
    """A user's tower: a backbone attribute, a head attribute, a forward of their own."""

    def __init__(self, backbone: nn.Module, head: nn.Module, features=None, names=("backbone", "head")):
        super().__init__()
        self._names, self._features = names, features or (lambda model, x: model(x))
        self.add_module(names[0], backbone)
        self.add_module(names[1], head)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._names[1])(self._features(getattr(self, self._names[0]), images))


def _eva_cls_mean(model, images):
    tokens = model.forward_features(images)
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)


def _served(tmp_path, checkpoint, sample_dir, model: nn.Module, capsys, *extra: str) -> dict:
    """inspect FILE --append M; then M's vectors against the model's own forward on M's views. The entry."""
    (tmp_path / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": []}))
    capsys.readouterr()
    assert main(["inspect", str(checkpoint), "--append", str(manifest), *extra]) == 0
    printed = capsys.readouterr().out
    assert "# added tower" in printed and "Not in the file" in printed
    entry = yaml.safe_load(manifest.read_text())["towers"][0]
    assert not entry.get("checkpoint", "x").startswith("/")  # relative to the manifest, as manifests are written
    assert main(["validate-manifest", "--deep", str(manifest)]) == 0
    assert_served_as_own_forward(model, manifest, sample_dir / "images", batch_size=4, distinct=0.9999)
    return entry


def test_a_lightning_eva02_with_cls_mean_pooling(tmp_path, sample_dir, capsys):
    backbone = timm.create_model(EVA, pretrained=False, num_classes=0, depth=2, global_pool="token",
                                 dynamic_img_size=True)
    model = _image_dependent(Wrapped(backbone, nn.Linear(2 * 192, 384, bias=False), _eva_cls_mean))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3,
                "pytorch-lightning_version": "2.4.0"}, tmp_path / "eva.ckpt")
    entry = _served(tmp_path, tmp_path / "eva.ckpt", sample_dir, model, capsys)
    assert entry["arch"].startswith("eva02_tiny_patch14") and entry["backbone"]["global_pool"] == "cls_mean"
    assert entry["backbone"]["model_kwargs"] == {"depth": 2} and entry["head"] == {"type": "linear", "bias": False}


def test_a_vit_whose_logits_feed_an_mlp_head_with_dropout(tmp_path, sample_dir, capsys):
    """The classifier kept (100 logits) and an MLP whose Dropout shifts its layers' indices (renamed to ours)."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100, depth=2, dynamic_img_size=True)
    head = nn.Sequential(nn.Linear(100, 64), nn.LayerNorm(64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 384))
    model = _image_dependent(Wrapped(vit, head, names=("vit", "mlp")))
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    entry = _served(tmp_path, tmp_path / "vit.pth", sample_dir, model, capsys)
    assert entry["features"] == "logits" and entry["backbone"]["num_classes"] == 100
    assert entry["head"]["hidden"] == 64 and entry["head"]["norm"] == "layernorm"
    assert entry["checkpoint_keys"] == {"rename": {"mlp.4.": "mlp.3."}}


def test_a_bare_timm_convnext_whose_classifier_is_the_head(tmp_path, sample_dir, capsys):
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=384).eval()
    torch.save({"model": model.state_dict(), "optimizer": {}}, tmp_path / "cnx.pth")
    entry = _served(tmp_path, tmp_path / "cnx.pth", sample_dir, model, capsys)
    assert entry["arch"].startswith("convnext_atto") and entry["head"] == {"type": "linear"}


def test_a_tower_of_another_width_is_inspected_and_proved_at_that_width(tmp_path, sample_dir):
    """`--embedding-dim 256` (a target text model other than MiniLM): inspect's entry and --expect's check parse
    the entry at 256, with no 256-d fallback vector needed (a one-entry parse, not a manifest around it)."""
    from kaggle_i2p.inference.expect import check_entry, read_images, served_vectors, spec_of

    model = timm.create_model("convnext_atto", pretrained=False, num_classes=256).eval()
    torch.save(model.state_dict(), tmp_path / "cnx256.pth")
    found = inspect_checkpoint(tmp_path / "cnx256.pth", embedding_dim=256)
    assert found.entry["arch"].startswith("convnext_atto") and found.entry["head"] == {"type": "linear"}
    _, pixels = read_images(sample_dir / "images")
    own = served_vectors(spec_of(found.entry, 256, tmp_path), model, pixels)  # the model's own forward, 256-d
    reading = check_entry(found.entry, 256, tmp_path, own, pixels)
    assert own.shape == (7, 256) and reading.passed and reading.cosines.min() >= 0.9999


def test_a_whole_open_clip_file_with_its_model_config_beside_it(tmp_path, sample_dir, capsys):
    from kaggle_i2p.models.backbones.open_clip_models import OPEN_CLIP

    (tmp_path / "tiny_clip.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    torch.manual_seed(0)
    visual = _image_dependent(OPEN_CLIP.build(str(tmp_path / "tiny_clip.json"), None, 0).module)  # open_clip's own
    whole = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    whole |= {"token_embedding.weight": torch.zeros(10, 64), "text_projection": torch.zeros(64, 32),
              "logit_scale": torch.ones(())}
    head = nn.Linear(32, 384)
    whole |= {f"head.{k}": v for k, v in head.state_dict().items()}
    torch.save(whole, tmp_path / "clip.pt")
    model = Wrapped(visual, head)
    entry = _served(tmp_path, tmp_path / "clip.pt", sample_dir, model, capsys)
    assert entry["library"] == "open_clip" and entry["arch"] == "tiny_clip.json"


@pytest.mark.parametrize("family", ["clip_vision", "siglip", "blip2"])
def test_hf_towers_with_the_config_save_pretrained_wrote_beside_them(tmp_path, sample_dir, capsys, family):
    data = tiny_hf_config(family)
    config = hf.CONFIG_MAPPING[data["model_type"]].from_dict(data)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(data))
    if family == "blip2":
        torch.manual_seed(0)
        inner, width = hf.Blip2Model(config), config.qformer_config.hidden_size

        def features(model, images):
            return model.get_qformer_features(pixel_values=images, interpolate_pos_encoding=True).mean(dim=1)
    elif family == "siglip":
        inner, width = hf.SiglipVisionModel(config), config.hidden_size

        def features(model, images):
            return model(pixel_values=images, interpolate_pos_encoding=True).pooler_output
    else:
        inner, width = hf.CLIPVisionModelWithProjection(config), config.projection_dim

        def features(model, images):
            return model(pixel_values=images, interpolate_pos_encoding=True).image_embeds
    model = _image_dependent(Wrapped(inner, nn.Linear(width, 384), features, names=("vision", "fc")))
    torch.save(model.state_dict(), folder / "tower.pth")
    entry = _served(tmp_path, folder / "tower.pth", sample_dir, model, capsys)
    assert entry["features"] == {"blip2": "query_mean", "siglip": "pooled"}.get(family, "image_embeds")
    assert entry["arch"] == "model/config.json"


def test_an_exported_whole_tower(tmp_path, sample_dir, capsys):
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc = nn.Conv2d(3, 16, 4, 4), nn.Linear(16, 384)

        def forward(self, images):
            return self.fc(torch.relu(self.conv(images)).mean(dim=(2, 3)))

    model = Tower().eval()
    dims = {"images": {0: torch.export.Dim("batch"), 2: torch.export.Dim("h", min=16, max=512),
                       3: torch.export.Dim("w", min=16, max=512)}}
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=dims),
                      str(tmp_path / "tower.pt2"))
    entry = _served(tmp_path, tmp_path / "tower.pt2", sample_dir, model, capsys)
    assert entry["library"] == "export" and entry["head"] == {"type": "none"} and "checkpoint" not in entry


def test_head_guesses_read_linear_and_mlp_heads_from_shapes():
    shapes = {"backbone.blocks.0.mlp.fc2.weight": (384, 1536), "head.0.weight": (512, 768), "head.0.bias": (512,),
              "head.1.weight": (512,), "head.1.bias": (512,), "head.1.running_mean": (512,),
              "head.1.running_var": (512,), "head.1.num_batches_tracked": (), "head.3.weight": (384, 512)}
    first = head_guesses(shapes, 384)[0]
    assert first.head == {"type": "mlp", "hidden": 512, "norm": "batchnorm", "activation": "relu", "bias": False}
    assert first.in_dim == 768 and first.rename == {}  # already our layout; the block's fc2 is never a head
    assert head_guesses({"w_head.weight": (384, 64)}, 384)[0].head == {"type": "linear", "bias": False}
    assert head_guesses({}, 384)[-1].head == {"type": "none"}


@pytest.mark.parametrize("case", ["unknown", "hf_without_config", "missing_key", "pickle"])
def test_a_file_inspect_cannot_read_is_one_message(tmp_path, capsys, case):
    path = tmp_path / "x.pth"
    if case == "unknown":
        torch.save({"encoder.w": torch.zeros(3, 3), "decoder.w": torch.zeros(3)}, path)
        want = "matches no reading inspect knows; pass --library and --arch"
    elif case == "hf_without_config":
        data = tiny_hf_config("clip_vision")
        model = hf.CLIPVisionModel(hf.CONFIG_MAPPING[data["model_type"]].from_dict(data))
        torch.save({**model.state_dict(), "fc.weight": torch.zeros(384, 32)}, path)
        want = "config.json"
    elif case == "missing_key":
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=384, depth=2)
        state = vit.state_dict()
        del state["blocks.1.attn.qkv.weight"]
        torch.save(state, path)
        want = "blocks.1.attn.qkv.weight"
    else:
        torch.save(nn.Linear(2, 2), path)
        want = "holds a whole pickled torch.nn.modules.linear.Linear object (torch.save(model)), whose code is never"
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err, err


def test_append_refuses_a_name_the_manifest_has_and_leaves_it_as_it_was(tmp_path, capsys):
    torch.save(timm.create_model("convnext_atto", pretrained=False, num_classes=384).state_dict(), tmp_path / "c.pth")
    (tmp_path / "fallback.npy").write_bytes(PRIOR_PATH.read_bytes())
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": "fallback.npy", "towers": []}))
    assert main(["inspect", str(tmp_path / "c.pth"), "--append", str(manifest)]) == 0
    before = manifest.read_bytes()
    assert main(["inspect", str(tmp_path / "c.pth"), "--append", str(manifest)]) == 2
    assert "already has a tower named 'c'; pass --name" in capsys.readouterr().err
    assert manifest.read_bytes() == before
    found = inspect_checkpoint(tmp_path / "c.pth", name="second")
    assert found.entry["name"] == "second" and "convnext_atto" in found.text()


@pytest.mark.parametrize(("build", "extra", "want"), [
    (lambda: ("model.", timm.create_model("eva02_large_patch14_clip_336", num_classes=0, global_pool="token")),
     {"head.weight": (384, 2048)}, ("timm", "eva02_large_patch14_clip_336", {"global_pool": "cls_mean"})),
    (lambda: ("", timm.create_model("convnext_xxlarge", num_classes=384)), {}, ("timm", "convnext_xxlarge", None)),
    (lambda: ("net.", timm.create_model("swin_base_patch4_window7_224", num_classes=0)),
     {"fc.weight": (384, 1024), "fc.bias": (384,)}, ("timm", "swin_base_patch4_window7_224", None)),
    (lambda: ("visual.", __import__("kaggle_i2p.models.backbones.open_clip_models", fromlist=["x"]).OPEN_CLIP.build(
        "ViT-L-14-336", None, 0).module), {"token_embedding.weight": (49408, 768), "head.weight": (384, 768)},
     ("open_clip", "ViT-L-14-336", None)),
])
def test_the_winners_towers_are_recognised_at_their_real_sizes(tmp_path, monkeypatch, build, extra, want):
    """The 5th place's EVA02-L (CLS+mean), a ConvNeXt-XXL with timm's classifier as the head, a whole open_clip
    ViT-L/14-336 file: their real keys and shapes (built on the meta device: 300M+ parameters, no file of that size
    in a test), read as the file would be."""
    import kaggle_i2p.models.recognise as recognise
    import kaggle_i2p.models.towers as towers

    with torch.device("meta"):
        prefix, model = build()
        shapes = {f"{prefix}{k}": tuple(v.shape) for k, v in model.state_dict().items()} | extra
    monkeypatch.setattr(recognise, "_read_shapes", lambda path: (dict(shapes), None, None))
    monkeypatch.setattr(recognise, "describe_file", lambda path, *a: "a state dict")
    monkeypatch.setattr(towers, "checkpoint_shapes_and_keys", lambda path, *a: (
        {k: torch.empty(v, device="meta") for k, v in shapes.items()}, set(shapes)))
    (tmp_path / "big.pth").write_bytes(b"")
    entry = inspect_checkpoint(tmp_path / "big.pth").entry
    assert (entry["library"], entry["arch"], entry.get("backbone")) == want


def test_a_timm_model_outside_the_recognised_families_is_read_when_arch_names_it(tmp_path, sample_dir, capsys):
    """A ResNet saved whole by timm's own code (its `fc` the 384-d head): its keys name no family inspect knows by
    them, so --arch names it; the named model is built and kept because the file has its keys and shapes."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=384).eval()
    torch.save(model.state_dict(), tmp_path / "resnet.pth")
    assert main(["inspect", str(tmp_path / "resnet.pth")]) == 2  # without --arch: one message, what to pass
    assert "Traceback" not in capsys.readouterr().err
    entry = _served(tmp_path, tmp_path / "resnet.pth", sample_dir, model, capsys, "--arch", "resnet10t")
    assert entry["arch"] == "resnet10t" and entry["head"] == {"type": "linear"} and "backbone" not in entry
    assert main(["inspect", str(tmp_path / "resnet.pth"), "--arch", "vit_tiny_patch16_224"]) == 2  # not this file
    assert "matches no reading" in capsys.readouterr().err
