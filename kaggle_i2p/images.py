"""Images: list a folder, decode each file once to uint8, batch, and make each tower's views on the device.

Decoding happens in DataLoader workers (overlapping compute); a file that cannot be decoded is reported, never fatal.
`make_view` is the one preprocessing function: inference and training both call it, so towers see identical inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .manifest import ImageSpec

log = logging.getLogger("kaggle_i2p")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageListingError(ValueError):
    """The image folder cannot be used as it is (missing, empty, or with ambiguous ids)."""


@dataclass(frozen=True)
class ImageListing:
    """The images of a folder in submission order: ids are file stems, sorted once."""

    directory: Path
    ids: tuple[str, ...]
    paths: tuple[Path, ...]
    skipped: tuple[Path, ...] = ()  # files that are not images by their suffix


def list_images(image_dir: str | Path) -> ImageListing:
    """List image files (png/jpg/jpeg/webp/bmp, any case) sorted by id; duplicate ids are an error."""
    directory = Path(image_dir)
    if not directory.is_dir():
        raise ImageListingError(f"image folder not found: {directory.resolve()}")
    by_id: dict[str, list[Path]] = {}
    skipped = []
    for path in directory.iterdir():
        if not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            by_id.setdefault(path.stem, []).append(path)
        else:
            skipped.append(path)
    duplicates = {k: v for k, v in by_id.items() if len(v) > 1}
    if duplicates:
        lines = [f"{k}: " + ", ".join(sorted(p.name for p in v)) for k, v in sorted(duplicates.items())]
        raise ImageListingError(f"{directory}: {len(duplicates)} image id(s) appear in more than one file, so the "
                                "submission row is ambiguous; keep one file per id:\n  " + "\n  ".join(lines))
    if not by_id:
        raise ImageListingError(f"{directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    if skipped:
        names = sorted(p.name for p in skipped)
        log.warning("%s: skipping %d non-image file(s): %s%s", directory, len(names), ", ".join(names[:10]),
                    " ..." if len(names) > 10 else "")
    ids = tuple(sorted(by_id))
    return ImageListing(directory, ids, tuple(by_id[i][0] for i in ids), tuple(sorted(skipped)))


def decode_image(path: str | Path) -> torch.Tensor:
    """Decode one file to a (3, H, W) uint8 RGB tensor: any PIL mode, EXIF orientation applied, first frame."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        rgb = image.convert("RGB")
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"decoded to an empty array {array.shape}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@dataclass
class DecodedBatch:
    """One batch of decoded images: row indices into the listing, pixels, and the files that failed."""

    indices: list[int]
    pixels: torch.Tensor | list[torch.Tensor]  # (B, 3, H, W) uint8 when sizes agree, else a list of (3, H, W)
    errors: list[tuple[int, str]] = field(default_factory=list)

    def pin_memory(self) -> DecodedBatch:
        pixels = self.pixels.pin_memory() if isinstance(self.pixels, torch.Tensor) else [
            p.pin_memory() for p in self.pixels]
        return DecodedBatch(self.indices, pixels, self.errors)

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

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        path = self.paths[index]
        try:
            return index, decode_image(path), None
        except Exception as err:  # noqa: BLE001 - every decoding failure becomes a fallback row
            reason = "empty file" if path.stat().st_size == 0 else f"{type(err).__name__}: {err}"
            return index, None, reason


def collate_decoded(items: list[tuple[int, torch.Tensor | None, str | None]]) -> DecodedBatch:
    """Stack same-sized images into one tensor; keep a list when sizes differ; set failures aside."""
    good = [(i, px) for i, px, err in items if px is not None]
    errors = [(i, err) for i, px, err in items if px is None]
    tensors = [px for _, px in good]
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        pixels: torch.Tensor | list[torch.Tensor] = torch.stack(tensors)
    else:
        pixels = tensors
    return DecodedBatch([i for i, _ in good], pixels, errors)


def image_loader(paths: Sequence[Path], batch_size: int, num_workers: int, pin_memory: bool = False,
                 batches: Sequence[Sequence[int]] | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader yielding DecodedBatch in order (listing order, or the given index batches); workers decode while
    the device computes."""
    dataset = DecodedImages(paths)
    common = {"num_workers": num_workers, "collate_fn": collate_decoded, "pin_memory": pin_memory,
              "prefetch_factor": 4 if num_workers > 0 else None}
    if batches is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in batches], **common)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)


def _resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    antialias = interpolation in ("bilinear", "bicubic")
    return F.interpolate(images, size=size, mode=interpolation, antialias=antialias,
                         align_corners=False if antialias else None)


def _resize_one_batch(images: torch.Tensor, spec: ImageSpec, resolution: int) -> torch.Tensor:
    """Resize a same-sized float batch to resolution x resolution, by squashing or shorter-side + centre crop."""
    height, width = images.shape[-2:]
    if spec.resize == "squash":
        return _resize(images, (resolution, resolution), spec.interpolation)
    scale = resolution / min(height, width)
    new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    resized = _resize(images, (new_h, new_w), spec.interpolation)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    return resized[..., top:top + resolution, left:left + resolution]


def make_view(pixels: torch.Tensor | Sequence[torch.Tensor], spec: ImageSpec, resolution: int,
              hflip: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) or a list of (3, H, W) -> normalised float (B, 3, r, r) as the tower expects.

    Resizing is antialiased (like PIL) and clamped to the 0-255 range a uint8 pipeline would keep.
    """
    if isinstance(pixels, torch.Tensor):
        resized = _resize_one_batch(pixels.float(), spec, resolution)
    else:
        resized = torch.cat([_resize_one_batch(p.unsqueeze(0).float(), spec, resolution) for p in pixels])
    device = resized.device
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255.0
    view = (resized.clamp_(0.0, 255.0) - mean) / std
    if hflip:
        view = view.flip(-1)
    return view.to(dtype).contiguous()
