"""Listing, decoding and per-tower views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kaggle_i2p.inference.images import ImageListingError, collate_decoded, decode_image, list_images, make_view
from kaggle_i2p.manifest import ImageSpec


def _spec(**kw) -> ImageSpec:
    base = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic", "resize": "squash",
            "resolutions": (64,), "hflip": False}
    return ImageSpec(**{**base, **kw})


def test_listing_sorts_skips_and_reports(tmp_path, caplog):
    for name in ["b.png", "a.JPG", "c.webp", "d.bmp", "notes.txt", ".DS_Store"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "subdir").mkdir()
    listing = list_images(tmp_path)
    assert listing.ids == ("a", "b", "c", "d")
    assert [p.name for p in listing.paths] == ["a.JPG", "b.png", "c.webp", "d.bmp"]
    assert [(s.name, s.reason) for s in listing.skipped] == [
        (".DS_Store", "not an image file by its suffix"), ("notes.txt", "not an image file by its suffix"),
        ("subdir", "a folder (only files directly in the image folder are predicted)")]
    assert "skipping 3 entries that are not image files: .DS_Store (not an image file by its suffix)" in caplog.text


def test_duplicate_ids_are_an_error(tmp_path):
    for name in ["a.png", "a.jpg", "b.png"]:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ImageListingError, match=r"(?s)1 image id\(s\) appear in more than one file.*a: a.jpg, a.png"):
        list_images(tmp_path)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(ImageListingError, match="image folder not found"):
        list_images(tmp_path / "nope")
    with pytest.raises(ImageListingError, match="no image files"):
        list_images(tmp_path)


@pytest.mark.parametrize("mode, suffix", [("RGBA", ".png"), ("L", ".png"), ("P", ".png"), ("CMYK", ".jpg"),
                                          ("RGB", ".webp"), ("RGB", ".bmp"), ("I;16", ".png"), ("LA", ".png")])
def test_any_mode_decodes_to_rgb_uint8(tmp_path, mode, suffix):
    path = tmp_path / f"x{suffix}"
    Image.new(mode, (40, 30)).save(path)
    pixels = decode_image(path)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 30, 40)


def test_real_sample_decodes(sample_dir):
    path = sorted((sample_dir / "images").iterdir())[0]
    pixels = decode_image(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (3, 512, 512) and np.array_equal(pixels.permute(1, 2, 0).numpy(), expected)


def test_collate_stacks_equal_sizes_and_lists_mixed():
    same = collate_decoded([(0, torch.zeros(3, 4, 4, dtype=torch.uint8), None, None), (1, None, "bad", None),
                            (2, torch.ones(3, 4, 4, dtype=torch.uint8), None, "a note")])
    assert same.indices == [0, 2] and same.errors == [(1, "bad")] and same.pixels.shape == (2, 3, 4, 4)
    assert same.notes == [(2, "a note")]
    mixed = collate_decoded([(0, torch.zeros(3, 4, 4, dtype=torch.uint8), None, None),
                             (1, torch.zeros(3, 6, 4, dtype=torch.uint8), None, None)])
    assert isinstance(mixed.pixels, list) and len(mixed.pixels) == 2


def test_view_normalises_with_manifest_statistics():
    pixels = torch.full((1, 3, 100, 80), 191, dtype=torch.uint8)  # 191/255 = 0.749
    view = make_view(pixels, _spec(), 64)
    assert view.shape == (1, 3, 64, 64) and view.dtype == torch.float32
    torch.testing.assert_close(view, torch.full_like(view, (191 / 255 - 0.5) / 0.25), rtol=0, atol=1e-5)


def test_view_resize_matches_pil(sample_dir):
    path = sorted((sample_dir / "images").iterdir())[1]
    pixels = decode_image(path).unsqueeze(0)
    spec = _spec(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ours = make_view(pixels, spec, 224)[0].permute(1, 2, 0).numpy() * 255
    pil = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32)
    assert np.abs(ours - pil).mean() < 1.0  # antialiased bicubic, like PIL (which also rounds to uint8)


def test_shorter_side_center_crop_and_flip():
    pixels = torch.zeros(1, 3, 60, 120, dtype=torch.uint8)
    pixels[..., 45:75] = 255  # a bright vertical band in the middle third
    pixels[..., :, 0:10] = 128  # a mark on the far left, cropped away by the centre crop
    spec = _spec(resize="shorter_side_center_crop", mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest")
    view = make_view(pixels, spec, 30)
    assert view.shape == (1, 3, 30, 30)
    assert view[0, 0, 0, 0] == 0.0  # left mark cropped
    assert view[0, 0, 0, 15] == pytest.approx(1.0)  # band kept in the centre
    squashed = make_view(pixels, _spec(mean=(0, 0, 0), std=(1, 1, 1), interpolation="nearest"), 30)
    assert squashed[0, 0, 0, 0] == pytest.approx(128 / 255)
    flipped = make_view(pixels, spec, 30, hflip=True)
    torch.testing.assert_close(flipped, view.flip(-1))


def test_mixed_size_list_gives_one_batch():
    pixels = [torch.zeros(3, 50, 70, dtype=torch.uint8), torch.full((3, 90, 40), 255, dtype=torch.uint8)]
    view = make_view(pixels, _spec(), 32)
    assert view.shape == (2, 3, 32, 32)
    assert view[1].min() == pytest.approx((1 - 0.5) / 0.25)
