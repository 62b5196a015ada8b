"""Images: list a folder, decode each file once to uint8, batch, and make each tower's views on the device.

Decoding happens in DataLoader workers (overlapping compute); a file that cannot be decoded is reported, never fatal.
`make_view` is the one preprocessing function: inference and training both call it, so towers see identical inputs.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..core.errors import I2PError
from ..manifest import ImageSpec

log = logging.getLogger("kaggle_i2p")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageListingError(I2PError, ValueError):
    """The image folder cannot be used as it is (missing, empty, or with ambiguous ids)."""


class Skipped(NamedTuple):
    """A folder entry that is not predicted, and why (a non-image file, a subfolder, a broken link)."""

    path: Path
    reason: str

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class ImageListing:
    """The images of a folder in submission order: ids are file stems, sorted once."""

    directory: Path
    ids: tuple[str, ...]
    paths: tuple[Path, ...]
    skipped: tuple[Skipped, ...] = ()  # every other entry of the folder, with its reason


# Characters that would break the CSV row `{id}_{e},{value}`: Kaggle's ids are hex, so such a file is a mistake.
UNSAFE_ID_CHARACTERS = re.compile(r'[,"\x00-\x1f\x7f]')


def _undecodable_at(name: str) -> int | None:
    """The byte offset of the first undecodable byte of a file name (Python holds them as surrogate escapes), or
    None when the name is text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as err:
        return len(os.fsencode(name[:err.start]))
    return None


def _skip_reason(path: Path) -> str | None:
    """Why a folder entry is not an image to predict, or None when it is one."""
    if path.is_symlink() and not path.exists():
        return "broken symbolic link"
    if path.is_dir():
        return "a folder (only files directly in the image folder are predicted)"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file by its suffix"
    return None


def list_images(image_dir: str | Path) -> ImageListing:
    """List image files (png/jpg/jpeg/webp/bmp/tif/tiff, any case) sorted by id; every other entry is listed as
    skipped with its reason. Duplicate ids and ids that would break the CSV are errors, raised before any compute."""
    directory = Path(image_dir)
    if not directory.is_dir():
        raise ImageListingError(f"image folder not found: {directory.resolve()}")
    by_id: dict[str, list[Path]] = {}
    skipped = []
    for path in directory.iterdir():
        reason = _skip_reason(path)
        if reason is None:
            by_id.setdefault(path.stem, []).append(path)
        else:
            skipped.append(Skipped(path, reason))
    duplicates = {k: v for k, v in by_id.items() if len(v) > 1}
    if duplicates:
        lines = [f"{k}: " + ", ".join(sorted(p.name for p in v)) for k, v in sorted(duplicates.items())]
        raise ImageListingError(f"{directory}: {len(duplicates)} image id(s) appear in more than one file, so the "
                                "submission row is ambiguous; keep one file per id:\n  " + "\n  ".join(lines))
    unsafe = sorted(k for k in by_id if UNSAFE_ID_CHARACTERS.search(k))
    if unsafe:
        names = [repr(by_id[k][0].name) for k in unsafe]
        raise ImageListingError(f"{directory}: {len(unsafe)} file name(s) hold a comma, a double quote or a control "
                                "character, which would break the CSV row `{id}_{e},{value}`; rename them:\n  "
                                + "\n  ".join(names[:20]) + ("\n  ..." if len(names) > 20 else ""))
    undecodable = sorted(k for k in by_id if _undecodable_at(k) is not None)
    if undecodable:
        names = [f"{os.fsencode(by_id[k][0].name)!r} (byte {_undecodable_at(k)})" for k in undecodable]
        raise ImageListingError(f"{directory}: {len(undecodable)} file name(s) are not UTF-8 text, so their ids "
                                "cannot be written into the UTF-8 CSV; rename them (e.g. with `convmv` or by hand):\n  "
                                + "\n  ".join(names[:20]) + ("\n  ..." if len(names) > 20 else ""))
    if not by_id:
        raise ImageListingError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)})"
                                + (f"; {len(skipped)} other entries skipped" if skipped else ""))
    skipped.sort()
    if skipped:
        shown = [f"{s.name} ({s.reason})" for s in skipped[:10]]
        log.warning("%s: skipping %d entr%s that %s not image files: %s%s", directory, len(skipped),
                    "y" if len(skipped) == 1 else "ies", "is" if len(skipped) == 1 else "are", "; ".join(shown),
                    " ..." if len(skipped) > 10 else "")
    ids = tuple(sorted(by_id))
    return ImageListing(directory, ids, tuple(by_id[i][0] for i in ids), tuple(skipped))


def _to_8bit(image: Image.Image) -> tuple[Image.Image, str | None]:
    """High-bit-depth and float images scaled to 8 bits (PIL's own conversion clips them to white or black); a note
    says what was converted, and values that cannot be mapped raise ValueError (the image gets the fallback)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} pixels outside 0-65535 cannot be mapped to 8 bits")
        gray = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(gray, mode="L"), f"16-bit {image.mode} pixels scaled to 8 bits"
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all() or (values.size and (values.min() < 0 or values.max() > 1)):
            raise ValueError("float pixels must be finite and within 0-1 to be mapped to 8 bits")
        return Image.fromarray(np.rint(values * 255.0).astype(np.uint8), mode="L"), "float pixels scaled to 8 bits"
    return image, None


def decode_image_with_note(path: str | Path) -> tuple[torch.Tensor, str | None]:
    """`decode_image`, plus a note when the decode changed the data's depth (16-bit or float scaled to 8 bits)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        image, note = _to_8bit(image)
        rgb = image.convert("RGB")
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"decoded to an empty array {array.shape}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1), note


def decode_image(path: str | Path) -> torch.Tensor:
    """Decode one file to a (3, H, W) uint8 RGB tensor: any PIL mode (16-bit and float scaled to 8 bits), EXIF
    orientation applied, first frame."""
    return decode_image_with_note(path)[0]


@dataclass
class DecodedBatch:
    """One batch of decoded images: row indices into the listing, pixels, and the files that failed."""

    indices: list[int]
    pixels: torch.Tensor | list[torch.Tensor]  # (B, 3, H, W) uint8 when sizes agree, else a list of (3, H, W)
    errors: list[tuple[int, str]] = field(default_factory=list)
    notes: list[tuple[int, str]] = field(default_factory=list)  # decodes that changed the data (bit depth)

    def pin_memory(self) -> DecodedBatch:
        pixels = self.pixels.pin_memory() if isinstance(self.pixels, torch.Tensor) else [
            p.pin_memory() for p in self.pixels]
        return DecodedBatch(self.indices, pixels, self.errors, self.notes)

    def pixels_on(self, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(self.pixels, torch.Tensor):
            return self.pixels.to(device, non_blocking=True)
        return [p.to(device, non_blocking=True) for p in self.pixels]


class DecodedImages(torch.utils.data.Dataset):
    """Decodes listing rows; failures come back as messages so one bad file never stops a run."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None, str | None]:
        """(index, pixels or None, failure reason or None, decode note or None)."""
        path = self.paths[index]
        try:
            pixels, note = decode_image_with_note(path)
            return index, pixels, None, note
        except Exception as err:  # noqa: BLE001 - every decoding failure becomes a fallback row
            try:
                empty = path.stat().st_size == 0
            except OSError:
                empty = False
            return index, None, "empty file" if empty else f"{type(err).__name__}: {err}", None


def collate_decoded(items: list[tuple[int, torch.Tensor | None, str | None, str | None]]) -> DecodedBatch:
    """Stack same-sized images into one tensor; keep a list when sizes differ; set failures aside."""
    good = [(i, px) for i, px, _, _ in items if px is not None]
    errors = [(i, err) for i, px, err, _ in items if px is None]
    notes = [(i, note) for i, _, _, note in items if note]
    tensors = [px for _, px in good]
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        pixels: torch.Tensor | list[torch.Tensor] = torch.stack(tensors)
    else:
        pixels = tensors
    return DecodedBatch([i for i, _ in good], pixels, errors, notes)


def image_loader(paths: Sequence[Path], batch_size: int, num_workers: int, pin_memory: bool = False,
                 batches: Sequence[Sequence[int]] | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader yielding DecodedBatch in order (listing order, or the given index batches); workers decode while
    the device computes."""
    dataset = DecodedImages(paths)
    common = {"num_workers": num_workers, "collate_fn": collate_decoded, "pin_memory": pin_memory,
              "prefetch_factor": 2 if num_workers > 0 else None}
    if batches is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in batches], **common)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)


def area_weights(n_in: int, n_out: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_out, n_in) weights of OpenCV's INTER_AREA along one axis: each output pixel covers n_in / n_out input
    pixels and takes each by the part of it covered (a box filter downscaling; enlarging, a pixel straddling two
    takes both by their share, as OpenCV's own enlarging INTER_AREA does)."""
    scale = n_in / n_out
    edges = torch.arange(n_out + 1, dtype=torch.float64, device=device) * scale
    starts = torch.arange(n_in, dtype=torch.float64, device=device)
    covered = (torch.minimum(edges[1:, None], starts + 1) - torch.maximum(edges[:-1, None], starts)).clamp_(min=0)
    return (covered / covered.sum(dim=1, keepdim=True)).float()


def _resize_area(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """INTER_AREA as two matrix products, one per axis (exact, any scale factor, on the images' device)."""
    rows = area_weights(images.shape[-2], size[0], images.device)
    cols = area_weights(images.shape[-1], size[1], images.device)
    return rows @ images @ cols.T


def _resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if interpolation == "area":
        return _resize_area(images, size)
    antialias = interpolation in ("bilinear", "bicubic")
    return F.interpolate(images, size=size, mode=interpolation, antialias=antialias,
                         align_corners=False if antialias else None)


def eval_size(resolution: int, crop_pct: float | None) -> int:
    """The size an eval transform resizes to before its centre crop of `resolution`: timm's floor(r / crop_pct)."""
    # (a ratio written with 6 decimals, an HF processor's 64 / 73, still gives 73: a hair of slack before the floor)
    return resolution if crop_pct is None else max(resolution, math.floor(resolution / crop_pct + 1e-4))


def _resize_one_batch(images: torch.Tensor, spec: ImageSpec, resolution: int) -> torch.Tensor:
    """Resize a same-sized float batch to resolution x resolution: squash, or shorter side + centre crop; with
    `crop_pct`, to floor(r / crop_pct) first (both sides, or the shorter one) and then the centre r x r, as timm's and
    the HF processors' eval transforms do."""
    height, width = images.shape[-2:]
    size = eval_size(resolution, spec.crop_pct)
    if spec.resize == "squash":
        new_h = new_w = size
    else:
        scale = size / min(height, width)
        new_h, new_w = max(size, int(height * scale)), max(size, int(width * scale))  # torchvision's and HF's: int
    resized = _resize(images, (new_h, new_w), spec.interpolation) if (new_h, new_w) != (height, width) else images
    if (new_h, new_w) == (resolution, resolution):
        return resized
    top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))  # torchvision's
    return resized[..., top:top + resolution, left:left + resolution]


def make_view(pixels: torch.Tensor | Sequence[torch.Tensor], spec: ImageSpec, resolution: int,
              hflip: bool = False, dtype: torch.dtype = torch.float32, norm: int = 0) -> torch.Tensor:
    """uint8 (B, 3, H, W) or a list of (3, H, W) -> normalised float (B, 3, r, r) as the tower expects, under the
    tower's `norm`-th normalisation (`ImageSpec.normalisations`).

    Resizing is antialiased (like PIL) and clamped to the 0-255 range a uint8 pipeline would keep.
    """
    if isinstance(pixels, torch.Tensor):
        resized = _resize_one_batch(pixels.float(), spec, resolution)
    else:
        resized = torch.cat([_resize_one_batch(p.unsqueeze(0).float(), spec, resolution) for p in pixels])
    device = resized.device
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255.0 for v in spec.normalisations[norm])
    view = (resized.clamp_(0.0, 255.0) - mean) / std
    if hflip:
        view = view.flip(-1)
    return view.to(dtype).contiguous()
