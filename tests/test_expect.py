"""Proof against the user's own vectors (issue 33, part 5): `--expect VECTORS` serves the tower on the images the
vectors are of and compares image by image; inspect keeps the reading that matches among those the keys cannot tell
apart (pooling, norm, preprocessing), and refuses when none does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from kaggle_i2p.cli import main
from kaggle_i2p.core.resources import PRIOR_PATH
from kaggle_i2p.inference.dryrun import bundled_sample_dir
from kaggle_i2p.models.recognise import inspect_checkpoint

SAMPLE = bundled_sample_dir() / "images"


def _pil_images():
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted(SAMPLE.glob("*.png"))]


@pytest.fixture(scope="module")
def avg_vit(tmp_path_factory):
    """A timm ViT trained with mean pooling and its norm before the pooling (fc_norm=False), and its own outputs on
    the sample images through timm's eval transform: what the three notebook lines write."""
    import timm
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_data_config

    folder = tmp_path_factory.mktemp("avg_vit")
    torch.manual_seed(9)
    model = timm.create_model("test_vit", pretrained=False, num_classes=384, global_pool="avg", fc_norm=False).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "vit.safetensors"))
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    with torch.no_grad():
        vectors = model(torch.stack([transform(image) for image in _pil_images()])).numpy()
    np.save(folder / "vit.expect.npy", vectors)
    return folder, vectors


def test_without_expect_inspect_lists_the_readings_it_cannot_tell_apart(avg_vit):
    folder, _ = avg_vit
    found = inspect_checkpoint(folder / "vit.safetensors")
    text = found.text()
    assert "readings that serve differently" in text and "--expect" in text
    assert "backbone {global_pool: avg, model_kwargs: {fc_norm: false}}" in text  # what was trained is among them


def test_expect_keeps_the_reading_that_matches_and_appends_it(avg_vit, tmp_path, capsys):
    folder, _ = avg_vit
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": []}))
    assert main(["inspect", str(folder / "vit.safetensors"), "--expect", str(folder / "vit.expect.npy"),
                 "--append", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "--expect: backbone {global_pool: avg, model_kwargs: {fc_norm: false}} matches your vectors" in out
    (entry,) = yaml.safe_load(manifest.read_text())["towers"]
    assert entry["backbone"] == {"global_pool": "avg", "model_kwargs": {"fc_norm": False}}
    assert main(["validate-manifest", str(manifest), "--expect", str(folder / "vit.expect.npy")]) == 0
    assert "matches" in capsys.readouterr().out


def test_expect_refuses_when_no_reading_matches_and_appends_nothing(avg_vit, tmp_path, capsys):
    folder, vectors = avg_vit
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(0).normal(size=vectors.shape).astype(np.float32))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": []}))
    before = manifest.read_text()
    assert main(["inspect", str(folder / "vit.safetensors"), "--expect", str(other), "--append", str(manifest)]) == 1
    captured = capsys.readouterr()
    assert "no reading matches your vectors" in captured.out and "the closest is" in captured.out
    assert "nothing appended" in captured.err and manifest.read_text() == before


def test_validate_manifest_expect_reads_a_submission_csv_and_fails_a_wrong_entry(avg_vit, tmp_path, capsys):
    from kaggle_i2p.inference.submission import write_submission

    folder, vectors = avg_vit
    ids = sorted(p.stem for p in SAMPLE.glob("*.png"))
    write_submission(ids, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), tmp_path / "mine.csv")
    found = inspect_checkpoint(folder / "vit.safetensors")
    wrong = dict(found.entry)  # the first reading: the class token, which was not trained
    path = tmp_path / "wrong.yaml"
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": [wrong]}))
    assert main(["validate-manifest", str(path), "--expect", str(tmp_path / "mine.csv")]) == 1
    assert "does not match" in capsys.readouterr().out
    right = {**wrong, "backbone": {"global_pool": "avg", "model_kwargs": {"fc_norm": False}}}
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": [right]}))
    assert main(["validate-manifest", str(path), "--expect", str(tmp_path / "mine.csv")]) == 0


def test_expect_finds_the_preprocessing_nothing_beside_the_file_says(tmp_path, capsys):
    """An HF CLIP vision tower saved without its processor's config: its mean/std, resize and crop are the family's
    usual guesses; the user's vectors were made with ImageNet statistics and a plain squash, which --expect finds."""
    import transformers as hf

    from kaggle_i2p.inference.images import decode_image, make_view
    from kaggle_i2p.manifest import ImageSpec
    from kaggle_i2p.testing import tiny_hf_config

    data = tiny_hf_config("clip_vision")
    torch.manual_seed(10)
    model = hf.CLIPVisionModel(hf.CONFIG_MAPPING[data["model_type"]].from_dict(data)).eval()
    model.save_pretrained(tmp_path / "clip")
    head = torch.nn.Linear(data["hidden_size"], 384)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    trained = ImageSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear",
                        resize="squash", resolutions=(64,))
    with torch.no_grad():
        views = torch.cat([make_view([decode_image(p)], trained, 64) for p in sorted(SAMPLE.glob("*.png"))])
        np.save(tmp_path / "mine.npy", head(model(pixel_values=views).pooler_output).numpy())
    assert main(["inspect", str(tmp_path / "clip"), str(tmp_path / "head.pth"), "--expect",
                 str(tmp_path / "mine.npy")]) == 0
    out = capsys.readouterr().out
    assert "image squash, bilinear, ImageNet mean/std matches your vectors" in out


def test_expect_vectors_of_the_wrong_shape_are_one_message(avg_vit, tmp_path, capsys):
    folder, vectors = avg_vit
    np.save(tmp_path / "short.npy", vectors[:3])
    assert main(["inspect", str(folder / "vit.safetensors"), "--expect", str(tmp_path / "short.npy")]) == 2
    assert "has shape (3, 384); expected (7, D)" in capsys.readouterr().err
    assert main(["inspect", str(folder / "vit.safetensors"), "--expect", str(tmp_path / "none.npy")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_notebook_checks_a_tower_whose_vectors_sit_beside_it(avg_vit, tmp_path):
    """`NAME.expect.npy` beside `NAME.safetensors`: check_beside (the Kaggle notebook's interactive check) serves the
    tower as its manifest says and compares; a wrong entry is reported, a tower without the file is not checked."""
    import shutil

    from kaggle_i2p.inference.expect import check_beside
    from kaggle_i2p.manifest import load_manifest

    folder, _ = avg_vit
    for name in ("vit.safetensors", "vit.expect.npy"):
        shutil.copyfile(folder / name, tmp_path / name)
    found = inspect_checkpoint(tmp_path / "vit.safetensors")
    right = {**found.entry, "backbone": {"global_pool": "avg", "model_kwargs": {"fc_norm": False}}}
    wrong = {**found.entry, "name": "wrong"}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"embedding_dim": 384, "fallback": str(PRIOR_PATH), "towers": [right, wrong]}))
    checked = dict(check_beside(load_manifest(path)))
    assert checked["vit"].passed and not checked["wrong"].passed
    (tmp_path / "vit.expect.npy").unlink()
    assert check_beside(load_manifest(path)) == []
