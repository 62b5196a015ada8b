"""Preprocessing as the clients used it (issue 23, step 5): `interpolation: area` is OpenCV's INTER_AREA (the 28th
place resized with it), and `image.norms` runs every image under several mean/std pairs on one set of weights (the 4th
place's TTA), each a view that is cached, tuned per view, planned and written back like any other."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import yaml

import kaggle_i2p
from kaggle_i2p.cli import main
from kaggle_i2p.core.ensemble import combine_views
from kaggle_i2p.inference.images import area_weights, decode_image, make_view
from kaggle_i2p.manifest import ImageSpec, load_manifest
from kaggle_i2p.models.towers import load_tower
from kaggle_i2p.testing import CLIP_MEAN, CLIP_STD, tiny_tower_manifest
from kaggle_i2p.tuning.evaluate import view_predictions

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _ids(sample_dir) -> list[str]:
    return sorted(p.stem for p in (sample_dir / "images").iterdir())


def _edit(path, **image) -> None:
    data = yaml.safe_load(path.read_text())
    for key, value in image.items():
        if value is None:
            data["towers"][0]["image"].pop(key, None)
        else:
            data["towers"][0]["image"][key] = value
    path.write_text(yaml.safe_dump(data))


def _run(path, sample_dir, **options):
    return kaggle_i2p.run_prediction(sample_dir / "images", path, device="cpu", num_workers=0, progress=False,
                                     batch_size=4, **options)


@pytest.mark.parametrize(("size", "out"), [((768, 768), (224, 224)), ((768, 768), (336, 336)),
                                           ((100, 130), (37, 50)), ((64, 64), (32, 32)), ((50, 40), (120, 97))])
def test_area_is_opencvs_inter_area_at_any_scale(size, out):
    image = np.random.default_rng(sum(size + out)).random((*size, 3)).astype(np.float32) * 255
    want = cv2.resize(image, out[::-1], interpolation=cv2.INTER_AREA)
    planes = torch.from_numpy(image).permute(2, 0, 1)
    ours = area_weights(size[0], out[0]) @ planes @ area_weights(size[1], out[1]).T
    np.testing.assert_allclose(ours.permute(1, 2, 0).numpy(), want, atol=2e-3)
    if out[0] == out[1]:  # and the views made with it, on the 0-1 scale
        spec = ImageSpec(mean=(0, 0, 0), std=(1, 1, 1), interpolation="area", resize="squash", resolutions=out[:1])
        view = make_view(planes[None], spec, out[0])[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(view * 255, want.clip(0, 255), atol=2e-3)


def test_a_tower_resized_with_area_serves_what_its_opencv_pipeline_computed(tmp_path, sample_dir):
    """The 28th place's dataset: cv2.imread, BGR -> RGB, cv2.resize(INTER_AREA) to uint8, then mean/std."""
    path = tiny_tower_manifest(tmp_path, "timm", "regressor")
    _edit(path, interpolation="area", resolutions=[64, 96], hflip=False)
    spec = load_manifest(path).towers[0]
    got = _run(path, sample_dir).embeddings
    tower = load_tower(spec)
    views = []
    for resolution in spec.image.resolutions:
        batch = []
        for image_id in _ids(sample_dir):
            bgr = cv2.imread(str(sample_dir / "images" / f"{image_id}.png"), cv2.IMREAD_COLOR)
            rgb = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (resolution, resolution),
                             interpolation=cv2.INTER_AREA).astype(np.float32) / 255
            batch.append((rgb - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32))
        with torch.no_grad():
            views.append(tower(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()).numpy())
    want = combine_views(views, spec.view_weight_list())
    assert (np.sum(got * want, axis=1) >= 0.9999).all()  # OpenCV rounds to uint8 after resizing; we do not
    assert load_manifest(path).towers[0].to_dict()["image"]["interpolation"] == "area"


def test_norms_are_views_of_one_set_of_weights(tmp_path, sample_dir):
    path = tiny_tower_manifest(tmp_path, "timm", "regressor")
    one = _run(path, sample_dir)
    _edit(path, mean=None, std=None, hflip=False,
          norms=[{"mean": CLIP_MEAN, "std": CLIP_STD}, {"mean": IMAGENET[0], "std": IMAGENET[1]}])
    spec = load_manifest(path).towers[0]
    assert [v.name for v in spec.views] == ["r64", "r64_n2", "r96", "r96_n2"]
    assert spec.to_dict()["image"]["norms"][1] == {"mean": IMAGENET[0], "std": IMAGENET[1]}
    assert "mean" not in spec.to_dict()["image"]
    run = _run(path, sample_dir, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(run.view_outputs["tiny"]["r64"], one.view_outputs["tiny"]["r64"])  # CLIP's, as before
    tower = load_tower(spec)
    pixels = [decode_image(sample_dir / "images" / f"{i}.png") for i in _ids(sample_dir)]
    with torch.no_grad():
        imagenet = tower(make_view(pixels, spec.image, 96, norm=1)).numpy()
        by_hand = tower(((make_view(pixels, spec.image, 96) * torch.tensor(CLIP_STD).view(1, 3, 1, 1)
                          + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1))
                        / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)).numpy()
    np.testing.assert_allclose(run.view_outputs["tiny"]["r96_n2"], imagenet, rtol=0, atol=1e-5)
    np.testing.assert_allclose(imagenet, by_hand, rtol=0, atol=1e-4)
    assert not np.allclose(run.view_outputs["tiny"]["r96_n2"], run.view_outputs["tiny"]["r96"], atol=1e-3)
    want = combine_views([run.view_outputs["tiny"][v.name] for v in spec.views], spec.view_weight_list())
    np.testing.assert_allclose(run.embeddings, want, atol=1e-6)

    again = _run(path, sample_dir, cache_dir=tmp_path / "cache")  # every view from the cache, the same bytes
    assert again.summary.cached_images == len(again.ids)
    np.testing.assert_array_equal(again.embeddings, run.embeddings)
    preds, groups = view_predictions(run, load_manifest(path).fallback)
    assert set(groups) == {"tiny/r64", "tiny/r64_n2", "tiny/r96", "tiny/r96_n2"}

    _edit(path, view_weights={"r64": 0.0, "r64_n2": 0.0, "r96": 1.0, "r96_n2": 3.0})
    weighted = _run(path, sample_dir, cache_dir=tmp_path / "cache")
    assert weighted.summary.cached_images == len(weighted.ids)  # view weights are applied after the cache
    np.testing.assert_allclose(weighted.embeddings, combine_views(
        [run.view_outputs["tiny"][n] for n in ("r64", "r64_n2", "r96", "r96_n2")], [0, 0, 1, 3]), atol=1e-6)

    _edit(path, norms=[{"mean": CLIP_MEAN, "std": CLIP_STD}, {"mean": IMAGENET[0], "std": [0.5, 0.5, 0.5]}])
    changed = _run(path, sample_dir, cache_dir=tmp_path / "cache")
    assert changed.summary.cached_images == 0  # another normalisation is another tower for the cache


def test_norms_are_planned_like_any_view(tmp_path, capsys):
    path = tiny_tower_manifest(tmp_path, "timm", "regressor")
    _edit(path, mean=None, std=None, norms=[{"mean": CLIP_MEAN, "std": CLIP_STD},
                                            {"mean": IMAGENET[0], "std": IMAGENET[1]}])
    assert main(["plan", "--manifest", str(path), "--device", "cpu", "--repeats", "1", "--workers", "0",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [v["view"] for v in plan["views"]] == ["r64", "r64_flip", "r64_n2", "r64_n2_flip", "r96", "r96_flip",
                                                  "r96_n2", "r96_n2_flip"]


@pytest.mark.parametrize(("image", "field", "message"), [
    ({"norms": [{"mean": CLIP_MEAN, "std": CLIP_STD}]}, "image.norms", "leave mean and std out"),
    ({"mean": None, "std": None, "norms": {"mean": CLIP_MEAN}}, "image.norms", "must be a list"),
    ({"mean": None, "std": None, "norms": [{"mean": CLIP_MEAN}]}, "image.norms[0].std", "is required"),
    ({"mean": None, "std": None, "norms": [{"mean": CLIP_MEAN, "std": [0, 1, 1]}]}, "image.norms[0].std",
     "positive"),
    ({"mean": None, "std": None, "norms": [{"mean": CLIP_MEAN, "std": CLIP_STD}] * 2}, "image.norms", "twice"),
    ({"interpolation": "lanczos"}, "image.interpolation", "area"),
])
def test_bad_norms_and_interpolations_are_one_message(tmp_path, capsys, image, field, message):
    path = tiny_tower_manifest(tmp_path, "timm", "regressor")
    _edit(path, **image)
    assert main(["validate-manifest", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"(towers[0]).{field}:" in err and message in err and "Traceback" not in err
