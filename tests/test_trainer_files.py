"""Every file a trainer writes, served as saved (issue 33, part 1): each built tiny here with its real library and
saved exactly as that library's code saves it, then read through `inspect`'s entry and served, its vectors equal to
the model's own forward on the same views (cosine >= 0.9999 per image, the image-dependent part too)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.manifest import ManifestError
from kaggle_i2p.models.recognise import inspect_checkpoint
from kaggle_i2p.models.towers import validate_manifest
from kaggle_i2p.testing import TINY_OPEN_CLIP_CONFIG, assert_served_as_own_forward, tiny_hf_config


def _manifest(folder: Path, entry: dict, name: str = "m.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": [entry]},
                                   sort_keys=False))
    return path


class Served(torch.nn.Module):
    """A model's own forward as the tower's: (B, 3, H, W) normalised views -> (B, 384)."""

    def __init__(self, forward):
        super().__init__()
        self.run = forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """timm's train.py output: `CheckpointSaver` with a model, its EMA (ModelEmaV3), the optimizer and the argparse
    Namespace of the run's arguments, after two steps (so the EMA and the raw weights differ)."""
    import timm
    from timm.utils import CheckpointSaver, ModelEmaV3

    out = tmp_path_factory.mktemp("timm_run")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=384)
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(2, 3, 160, 160)).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # a step large enough that the EMA and the raw weights serve different vectors
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        ema.update(model)
    args = argparse.Namespace(model="test_vit", lr=1e-3, mean=(0.5, 0.5, 0.5), output=str(out))
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=ema, checkpoint_dir=str(out),
                            recovery_dir=str(out), decreasing=False, max_history=2)
    saver.save_checkpoint(epoch=0, metric=0.5)
    return out / "model_best.pth.tar", model.eval(), ema.module.eval()


def test_timms_train_py_checkpoint_serves_the_set_the_entry_names(timm_run, tmp_path, sample_images):
    """`model_best.pth.tar` holds `state_dict` and `state_dict_ema`: an entry that does not say which is a problem
    naming both (never the raw weights served without a word); inspect's entry reads the EMA, as timm's loader does;
    `weights: state_dict` serves the raw weights; `strip: [state_dict_ema.]` (a rule that matches nothing) is a
    problem, not "OK"."""
    best, raw, ema = timm_run
    found = inspect_checkpoint(best)
    assert found.entry["checkpoint_keys"] == {"weights": "state_dict_ema"}
    assert "timm's train.py checkpoint" in found.text() and "argparse.Namespace" not in found.text()
    assert "the EMA, as timm's own loader serves it" in found.text()
    torch.save({"student": raw.state_dict(), "teacher": ema.state_dict()}, tmp_path / "two.pth")
    two = inspect_checkpoint(tmp_path / "two.pth")  # no EMA among the sets: the first, and said to be only that
    assert two.entry["checkpoint_keys"] == {"weights": "student"}
    assert "the first set it holds" in two.text() and "the EMA" not in two.text()
    served = assert_served_as_own_forward(ema, _manifest(tmp_path, found.entry), sample_images)
    raw_entry = {**found.entry, "checkpoint_keys": {"weights": "state_dict"}}
    served_raw = assert_served_as_own_forward(raw, _manifest(tmp_path, raw_entry, "raw.yaml"), sample_images)
    assert (served * served_raw).sum(axis=1).min() < 0.9999  # two different sets: the choice means something
    unsaid = {k: v for k, v in found.entry.items() if k != "checkpoint_keys"}
    with pytest.raises(ManifestError, match=r"2 sets of weights \(state_dict, state_dict_ema\).*weights: "
                                            r"state_dict_ema"):
        validate_manifest(_manifest(tmp_path, unsaid, "unsaid.yaml"), deep=True)
    wrong = {**unsaid, "checkpoint_keys": {"strip": ["state_dict_ema."]}}
    with pytest.raises(ManifestError, match="2 sets of weights"):
        validate_manifest(_manifest(tmp_path, wrong, "wrong.yaml"), deep=True)
    missing = {**unsaid, "checkpoint_keys": {"weights": "model_ema"}}
    with pytest.raises(ManifestError, match=r"checkpoint_keys.weights: .*no set of weights under 'model_ema'"):
        validate_manifest(_manifest(tmp_path, missing, "missing.yaml"), deep=True)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A tiny CLIP vision model as save_pretrained writes it (with its head saved apart), and a custom
    PreTrainedModel (CLIP vision + head) saved by HF Trainer.save_model and by accelerate's save_model, sharded."""
    import transformers as hf
    from accelerate import Accelerator

    folder = tmp_path_factory.mktemp("hf")
    data = tiny_hf_config("clip_vision")
    config = hf.CONFIG_MAPPING[data["model_type"]].from_dict(data)
    torch.manual_seed(0)
    vision = hf.CLIPVisionModel(config).eval()
    vision.save_pretrained(folder / "vision")
    head = torch.nn.Linear(config.hidden_size, 384)
    torch.save(head.state_dict(), folder / "head.pth")

    class RegressorConfig(hf.PretrainedConfig):
        model_type = "clip_regressor"

        def __init__(self, vision_config=None, out_dim=384, **kwargs):
            super().__init__(**kwargs)
            self.vision_config, self.out_dim = vision_config or {}, out_dim

    class Regressor(hf.PreTrainedModel):
        config_class = RegressorConfig

        def __init__(self, config):
            super().__init__(config)
            self.vision = hf.CLIPVisionModel(hf.CLIPVisionConfig(**config.vision_config))
            self.head = torch.nn.Linear(self.vision.config.hidden_size, config.out_dim)

        def forward(self, pixel_values):
            return self.head(self.vision(pixel_values=pixel_values).pooler_output)

    torch.manual_seed(1)
    regressor = Regressor(RegressorConfig(vision_config=config.to_dict())).eval()
    trainer = hf.Trainer(model=regressor, args=hf.TrainingArguments(output_dir=str(folder / "trainer"),
                                                                    report_to=[]))
    trainer.save_model(str(folder / "trainer"))
    Accelerator(cpu=True).save_model(regressor, str(folder / "accelerate"), max_shard_size="20KB")
    own = Served(lambda x: head(vision(pixel_values=x).pooler_output)).eval()
    return folder, own, Served(lambda x: regressor(x)).eval()


def test_a_save_pretrained_folder_with_its_head_in_a_file_of_its_own(hf_models, tmp_path, sample_images):
    folder, own, _ = hf_models
    found = inspect_checkpoint([folder / "vision", folder / "head.pth"])
    assert found.entry["checkpoint"] == [str(folder / "vision"), str(folder / "head.pth")]
    assert_served_as_own_forward(own, _manifest(tmp_path, found.entry), sample_images)
    alone = {**found.entry, "checkpoint": str(folder / "vision")}
    with pytest.raises(ManifestError, match="the head is not in this file"):
        validate_manifest(_manifest(tmp_path, alone, "alone.yaml"), deep=True)


@pytest.mark.parametrize("saved_by", ["trainer", "accelerate"])
def test_hf_trainer_and_accelerate_folders_of_a_custom_model_serve_as_saved(hf_models, tmp_path, sample_images,
                                                                            saved_by):
    """HF Trainer.save_model of a custom PreTrainedModel (its own model_type, the backbone's config nested under
    vision_config) and accelerate's sharded save_model of the same model: the folder is the checkpoint."""
    folder, _, regressor = hf_models
    arch = None if saved_by == "trainer" else str(folder / "trainer" / "config.json")  # accelerate writes no config
    if saved_by == "accelerate":
        assert (folder / "accelerate" / "model.safetensors.index.json").is_file()
    found = inspect_checkpoint(folder / saved_by, arch=arch)
    assert found.entry["checkpoint"] == str(folder / saved_by) and found.entry["library"] == "transformers"
    assert_served_as_own_forward(regressor, _manifest(tmp_path, found.entry), sample_images)
    index = {**found.entry, "checkpoint": str(folder / "accelerate" / "model.safetensors.index.json")}
    assert_served_as_own_forward(regressor, _manifest(tmp_path, index, "index.yaml"), sample_images)


def test_open_clips_epoch_file_and_a_head_saved_apart(tmp_path, sample_images):
    """open_clip's trainer writes `epoch_N.pt`: {epoch, name, state_dict (DDP's `module.` keys of the whole CLIP),
    optimizer}; the head was saved apart. Both files are the checkpoint."""
    import json

    import open_clip

    (tmp_path / "tiny_clip.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    torch.manual_seed(2)
    clip = open_clip.model.CLIP(**TINY_OPEN_CLIP_CONFIG).eval()
    optimizer = torch.optim.AdamW(clip.parameters())
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()},
                "optimizer": optimizer.state_dict()}, tmp_path / "epoch_3.pt")
    head = torch.nn.Linear(TINY_OPEN_CLIP_CONFIG["embed_dim"], 384)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    found = inspect_checkpoint([tmp_path / "epoch_3.pt", tmp_path / "head.pth"],
                               arch=str(tmp_path / "tiny_clip.json"))
    assert found.entry["library"] == "open_clip"
    own = Served(lambda x: head(clip.encode_image(x))).eval()
    assert_served_as_own_forward(own, _manifest(tmp_path, found.entry), sample_images)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_serve_their_own_values(tmp_path, sample_images, dtype):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("test_vit", pretrained=False, num_classes=384).eval()
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "half.safetensors"))
    model.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})  # the file's own values
    found = inspect_checkpoint(tmp_path / "half.safetensors")
    assert_served_as_own_forward(model, _manifest(tmp_path, found.entry), sample_images)


def test_a_folder_without_weights_and_keys_in_two_files_are_one_problem_each(hf_models, tmp_path):
    from kaggle_i2p.models.checkpoints import TowerLoadError, read_state_dict

    folder, _, _ = hf_models
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(TowerLoadError, match="folder without weights.*holds: config.json"):
        read_state_dict(empty)
    shutil.copyfile(folder / "head.pth", tmp_path / "head_again.pth")
    with pytest.raises(TowerLoadError, match="key 'weight' is in both"):
        read_state_dict((folder / "head.pth", tmp_path / "head_again.pth"))


# ---- whole pickled models: refused everywhere, converted only with consent ------------------------------------------

NET_CODE = '''
import torch
import timm


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("test_vit", pretrained=False, num_classes=0)
        self.head = torch.nn.Linear(64, 384)

    def forward(self, x):
        return self.head(self.backbone(x))


if __name__ == "__main__":
    open(MARKER, "w").write("the main block ran")
'''


def test_a_pickled_module_converts_only_with_consent_in_a_child_process(tmp_path, sample_images):
    """`torch.save(model)` of a class defined in the training script (`__main__.Net`): inspect refuses it and says
    how to convert; `convert` without --trust-pickle runs nothing; with it and `--code train.py` the child process
    writes the weights (the script's main block never runs) and the entry serves the model's own forward."""
    import subprocess
    import sys

    from kaggle_i2p.models.convert import ConvertError, convert_pickle
    from kaggle_i2p.models.recognise import InspectError

    marker = tmp_path / "MAIN_RAN"
    (tmp_path / "train.py").write_text(NET_CODE.replace("MARKER", repr(str(marker))))
    save = ("import runpy, sys, torch; sys.path.insert(0, sys.argv[1]); "
            "globals().update({k: v for k, v in runpy.run_path(sys.argv[1] + '/train.py').items() "
            "if k == 'Net'}); Net.__module__ = '__main__'; torch.manual_seed(4); "
            "torch.save(Net(), sys.argv[1] + '/net.pt')")
    subprocess.run([sys.executable, "-c", save, str(tmp_path)], check=True, timeout=120)
    with pytest.raises(InspectError, match=r"whole pickled __main__.Net.*kaggle-i2p convert net.pt --trust-pickle"):
        inspect_checkpoint(tmp_path / "net.pt")
    with pytest.raises(ConvertError, match="--trust-pickle"):
        convert_pickle(tmp_path / "net.pt")
    with pytest.raises(ConvertError, match="pass that file with --code"):
        convert_pickle(tmp_path / "net.pt", trust_pickle=True)
    out = convert_pickle(tmp_path / "net.pt", trust_pickle=True, code=[tmp_path / "train.py"])
    assert out == tmp_path / "net.safetensors" and not marker.exists()
    with pytest.raises(ConvertError, match="exists and is left as it is"):
        convert_pickle(tmp_path / "net.pt", trust_pickle=True, code=[tmp_path / "train.py"])
    import runpy

    net = runpy.run_path(str(tmp_path / "train.py"), run_name="net")["Net"]()
    from safetensors.torch import load_file

    net.load_state_dict(load_file(out))
    found = inspect_checkpoint(out)
    assert_served_as_own_forward(net.eval(), _manifest(tmp_path, found.entry), sample_images)


def test_a_payload_pickle_runs_only_under_convert_with_consent(tmp_path):
    import os

    from kaggle_i2p.models.convert import ConvertError, convert_pickle
    from kaggle_i2p.models.recognise import InspectError

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save(Payload(), tmp_path / "payload.pt")
    with pytest.raises(InspectError):
        inspect_checkpoint(tmp_path / "payload.pt")
    with pytest.raises(ConvertError):
        convert_pickle(tmp_path / "payload.pt")
    assert not marker.exists()
    with pytest.raises(ConvertError, match="no module or tensors"):
        convert_pickle(tmp_path / "payload.pt", trust_pickle=True)
    assert marker.exists()  # the user said they trust it: it ran, in the child process, and nothing was written
    assert not (tmp_path / "payload.safetensors").exists()


# ---- inspect's readings of the layouts people save ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "tiny_clip.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    torch.manual_seed(5)
    return folder, open_clip.model.CLIP(**TINY_OPEN_CLIP_CONFIG).eval()


def test_a_whole_clip_file_whose_head_has_its_own_name(tiny_clip, tmp_path, sample_images):
    """A whole open_clip CLIP wrapped under `clip.` with the head as `dense0.`: the head is found by its name and
    shapes (the text tower's `ln_final` has the same key names, other shapes)."""
    folder, clip = tiny_clip
    head = torch.nn.Linear(TINY_OPEN_CLIP_CONFIG["embed_dim"], 384)
    torch.save({**{f"clip.{k}": v for k, v in clip.state_dict().items()},
                **{f"dense0.{k}": v for k, v in head.state_dict().items()}}, tmp_path / "clip_dense.pt")
    found = inspect_checkpoint(tmp_path / "clip_dense.pt", arch=str(folder / "tiny_clip.json"))
    assert "`dense0`" in found.text()
    own = Served(lambda x: head(clip.encode_image(x))).eval()
    assert_served_as_own_forward(own, _manifest(tmp_path, found.entry), sample_images)


def test_a_traced_image_tower_with_its_head_in_a_file_of_its_own(tiny_clip, tmp_path, sample_images):
    """`torch.jit.trace(model.visual, x)` (whose graph keeps MultiheadAttention's data-dependent test, so fake
    tensors cannot run it) and the head's state dict: one program and its head, found at the trace's size."""
    import warnings

    _, clip = tiny_clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(clip.visual, torch.randn(2, 3, 64, 64), check_trace=False).save(str(tmp_path / "visual.pt"))
    head = torch.nn.Linear(TINY_OPEN_CLIP_CONFIG["embed_dim"], 384)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    found = inspect_checkpoint([tmp_path / "visual.pt", tmp_path / "head.pth"])
    assert found.entry["library"] == "torchscript" and found.entry["native_resolution"] == 64
    assert found.entry["checkpoint"] == str(tmp_path / "head.pth")
    own = Served(lambda x: head(clip.visual(x))).eval()
    assert_served_as_own_forward(own, _manifest(tmp_path, found.entry), sample_images)


def test_a_blip2_regressor_whose_vision_model_has_another_name(tmp_path, sample_images):
    """A BLIP-2 image side saved as `vision.` / `query_tokens` / `qformer.` / `head.`: the one rename that fits
    (`vision.` -> the vision model's) goes into the entry, the other parts read as they are."""
    import json

    import transformers as hf
    from safetensors.torch import save_file

    from kaggle_i2p.models.backbones.transformers_models import Blip2QueryTower

    data = tiny_hf_config("blip2")
    torch.manual_seed(6)
    tower = Blip2QueryTower(hf.CONFIG_MAPPING[data["model_type"]].from_dict(data)).eval()
    with torch.no_grad():  # weights large enough that the image shows through the tiny Q-Former's output
        for param in tower.parameters():
            param.normal_(0, 0.5)
    head = torch.nn.Linear(32, 384)
    state = {k.replace("vision_model.", "vision.", 1): v for k, v in tower.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    (tmp_path / "reg").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "reg" / "model.safetensors"))
    (tmp_path / "reg" / "config.json").write_text(json.dumps(data))
    found = inspect_checkpoint(tmp_path / "reg")
    assert found.entry["checkpoint_keys"]["rename"] == {"vision.": "backbone.vision_model."}
    own = Served(lambda x: head(tower(x))).eval()
    assert_served_as_own_forward(own, _manifest(tmp_path, found.entry), sample_images)


def test_a_relative_arch_is_read_from_where_inspect_runs(tiny_clip, tmp_path, monkeypatch):
    folder, clip = tiny_clip
    head = torch.nn.Linear(TINY_OPEN_CLIP_CONFIG["embed_dim"], 384)
    (tmp_path / "ckpt").mkdir()
    torch.save({**{f"visual.{k}": v for k, v in clip.visual.state_dict().items()},
                **{f"head.{k}": v for k, v in head.state_dict().items()}}, tmp_path / "ckpt" / "tower.pt")
    shutil.copyfile(folder / "tiny_clip.json", tmp_path / "tiny_clip.json")
    monkeypatch.chdir(tmp_path)
    found = inspect_checkpoint(Path("ckpt") / "tower.pt", arch="tiny_clip.json")
    assert found.entry["arch"] == str(tmp_path / "tiny_clip.json")


# ---- eval crops as trained, and preprocessing from what sits beside the file --------------------------------------

def _own_preprocessing(model, preprocess, image_dir: Path):
    """The model's vectors on its own eval transform of the sample images (PIL in, its tensors out), unit rows."""
    import numpy as np
    from PIL import Image

    paths = sorted(image_dir.iterdir())
    with torch.no_grad():
        out = model(preprocess([Image.open(p).convert("RGB") for p in paths])).numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _served(manifest: Path, image_dir: Path):
    import kaggle_i2p

    return kaggle_i2p.run_prediction(image_dir, manifest, device="cpu", num_workers=0, progress=False).embeddings


def test_timms_eval_crop_from_its_pretrained_cfg_serves_as_timms_transform(tmp_path, sample_images):
    """A ConvNeXt whose eval transform resizes to 256 and centre-crops 224 (crop_pct 0.875): inspect fills mean,
    std, interpolation and the crop from timm's pretrained_cfg and says so; the served vectors equal the model's on
    timm's own transform of the PIL images (the squash it once proposed served 0.62 of them)."""
    import timm
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(7)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=384).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "cx.safetensors"))
    found = inspect_checkpoint(tmp_path / "cx.safetensors")
    assert found.entry["image"]["crop_pct"] == 0.875
    assert found.entry["image"]["resize"] == "shorter_side_center_crop"
    assert any("from timm's pretrained_cfg of convnext_atto" in line for line in found.found)
    assert not any(line.startswith(("image.mean", "image.resize", "image.interpolation")) for line in found.ask)
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    want = _own_preprocessing(model, lambda images: torch.stack([transform(i) for i in images]), sample_images)
    got = _served(_manifest(tmp_path, found.entry), sample_images)
    assert ((got * want).sum(axis=1) >= 0.9999).all(), (got * want).sum(axis=1)
    squashed = {**found.entry, "image": {**found.entry["image"], "resize": "squash"}}
    squashed["image"].pop("crop_pct")
    assert (_served(_manifest(tmp_path, squashed, "sq.yaml"), sample_images) * want).sum(axis=1).min() < 0.9999


def test_an_hf_processors_crop_beside_the_weights_serves_as_the_processor(tmp_path, sample_images):
    """DINOv2's processor resizes the shorter side to 256 and crops 224: here 73 and 64, written beside the model by
    save_pretrained; inspect reads size, crop_size, resample, mean and std from it, and the served vectors equal the
    model's on the processor's own output."""
    import transformers as hf

    data = tiny_hf_config("dinov2")
    torch.manual_seed(8)
    model = hf.Dinov2Model(hf.CONFIG_MAPPING[data["model_type"]].from_dict(data)).eval()
    model.save_pretrained(tmp_path / "dino")
    hf.BitImageProcessor(size={"shortest_edge": 73}, crop_size={"height": 64, "width": 64}, do_center_crop=True,
                         resample=3, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path / "dino")
    head = torch.nn.Linear(data["hidden_size"], 384)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    found = inspect_checkpoint([tmp_path / "dino", tmp_path / "head.pth"])
    image = found.entry["image"]
    assert (image["resize"], image["resolutions"], round(image["crop_pct"] * 73)) == ("shorter_side_center_crop",
                                                                                      [64], 64)
    assert any("(from preprocessor_config.json)" in line for line in found.found)
    processor = hf.AutoImageProcessor.from_pretrained(tmp_path / "dino")
    own = Served(lambda x: head(model(pixel_values=x).pooler_output)).eval()
    want = _own_preprocessing(own, lambda images: processor(images, return_tensors="pt")["pixel_values"],
                              sample_images)
    got = _served(_manifest(tmp_path, found.entry), sample_images)
    assert ((got * want).sum(axis=1) >= 0.9999).all(), (got * want).sum(axis=1)


def test_timms_train_py_arguments_in_the_file_are_its_preprocessing(timm_run):
    best, _, _ = timm_run
    found = inspect_checkpoint(best)
    assert any("(from model_best.pth.tar's args (timm's train.py))" in line and "mean [0.5, 0.5, 0.5]" in line
               for line in found.found), found.found


def test_a_crop_pct_out_of_range_is_a_problem(tmp_path):
    from kaggle_i2p.manifest import parse_manifest

    entry = {"name": "t", "library": "timm", "arch": "test_vit", "checkpoint": "t.safetensors", "weight": 1.0,
             "image": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize": "squash",
                       "resolutions": [64], "crop_pct": 1.5}}
    with pytest.raises(ManifestError, match="crop_pct: 1.5 must be"):
        parse_manifest({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": [entry]}, tmp_path / "m.yaml",
                       check_files=False)
