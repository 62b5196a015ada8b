"""`--expect VECTORS`: proof that a tower serves what its user trained. The user's own model, in their training
notebook, writes its outputs for a folder of images (the 7 bundled sample images by default); the tower is served on
the same images and compared image by image: it passes at cosine >= 0.9999 for every one.

    # in the training notebook, after training (three lines):
    paths = sorted(Path(kaggle_i2p_sample_images).glob("*.png"))  # or the competition's 7 sample images
    x = torch.stack([eval_transform(Image.open(p).convert("RGB")) for p in paths])
    np.save("tower.expect.npy", model.eval()(x).float().detach().cpu().numpy())

With it, `inspect` tries every reading the keys cannot tell apart (pooling, final norm, features) and then every
preprocessing nothing beside the file said (resize, crop, interpolation, mean/std), and keeps the one that matches,
saying which; without a match it names the closest and how close. `validate-manifest --expect` checks an entry as
written. The comparison is on the tower's first view (its first resolution, no flip, its first normalisation): the
one view a training notebook's eval transform makes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import I2PError
from ..core.fileio import open_npy
from ..core.progress import say
from ..manifest import NetworkSpec, parse_entry
from .images import decode_image, list_images, make_view
from .runner import as_record

EXPECT_COSINE = 0.9999  # every image at least this close: the tower serves the user's model
NORMS = {"CLIP": ([0.4815, 0.4578, 0.4082], [0.2686, 0.2613, 0.2758]),
         "ImageNet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "0.5": ([0.5] * 3, [0.5] * 3)}
CROPS = (None, 0.875, 0.9, 0.95)


class ExpectError(I2PError, ValueError):
    """Expected vectors that cannot be compared: unreadable, another width, other image ids."""


def default_images() -> Path:
    """The images the vectors are of when nothing else is said: the 7 sample images bundled in the package."""
    from .dryrun import bundled_sample_dir

    return bundled_sample_dir() / "images"


def read_vectors(path: str | Path, ids: Sequence[str]) -> np.ndarray:
    """The user's vectors, one row per image in `ids` order: a `.npy` of (images, width) rows in the sorted ids'
    order, or a submission-style CSV (`imgId_eId,val`)."""
    path = Path(path)
    if not path.is_file():
        raise ExpectError(f"--expect {path}: no such file; write it in your training notebook (see "
                          "docs/manifest.md, 'Proof against your own vectors')")
    if path.suffix.lower() == ".csv":
        from .submission import read_submission

        try:
            frame = read_submission(path)
            split = frame["imgId_eId"].str.rsplit("_", n=1, expand=True)
            frame = frame.assign(image=split[0], e=split[1].astype(int), val=frame["val"].astype(float))
            table = frame.pivot(index="image", columns="e", values="val")
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ExpectError(f"--expect {path}: not a submission-style CSV (imgId_eId,val): {err}") from err
        missing = sorted(set(ids) - set(table.index))
        if missing:
            raise ExpectError(f"--expect {path}: has no rows for {len(missing)} of the images ({', '.join(missing[:4])}"
                              f"{' ...' if len(missing) > 4 else ''})")
        return table.loc[list(ids)].to_numpy(dtype=np.float32)
    vectors = np.asarray(open_npy(path, "--expect", ndim=2, rows=len(ids), mmap=False), dtype=np.float32)
    if not np.isfinite(vectors).all():
        raise ExpectError(f"--expect {path}: holds non-finite values")
    return vectors


def read_images(image_dir: str | Path | None) -> tuple[list[str], list[torch.Tensor]]:
    """The ids (sorted) and decoded pixels of the images the vectors are of."""
    listing = list_images(image_dir or default_images())
    return list(listing.ids), [decode_image(p) for p in listing.paths]


def cosines(served: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Per image, the cosine between the served vector and the user's."""
    if served.shape != expected.shape:
        raise ExpectError(f"the tower gives {served.shape[1]}-d vectors and the expected ones are "
                          f"{expected.shape[1]}-d: write the model's outputs (the head's), one row per image")
    a = served / np.maximum(np.linalg.norm(served, axis=1, keepdims=True), 1e-12)
    b = expected / np.maximum(np.linalg.norm(expected, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def spec_of(entry: dict, embedding_dim: int, base_dir: Path) -> NetworkSpec:
    """The tower spec of one entry (paths resolved against `base_dir`)."""
    return parse_entry(entry, embedding_dim, base_dir / "expect.yaml")


def served_vectors(spec: NetworkSpec, tower: torch.nn.Module, pixels: list[torch.Tensor],
                   device: str = "cpu") -> np.ndarray:
    """The tower's forward on its first view of every image, one image at a time: (images, width)."""
    view = spec.views[0]
    outputs = []
    with torch.no_grad():
        for image in pixels:
            batch = make_view([image], spec.image, view.resolution, view.flip, norm=view.norm)
            outputs.append(as_record(tower(batch.to(device))).values.cpu())  # a record or its values
    return torch.cat(outputs).numpy()


@dataclass
class Reading:
    """One reading tried: the entry, its cosines, and what set it apart."""

    entry: dict
    cosines: np.ndarray
    label: str

    @property
    def passed(self) -> bool:
        return bool((self.cosines >= EXPECT_COSINE).all())

    def line(self) -> str:
        return (f"{self.label}: cosine min {self.cosines.min():.6f}, mean {self.cosines.mean():.6f} over "
                f"{len(self.cosines)} images ({'matches' if self.passed else 'does not match'})")


@dataclass
class ExpectResult:
    """What the check found: the reading kept (the first that matches, or the closest), and every one tried."""

    best: Reading
    tried: list[Reading]

    @property
    def passed(self) -> bool:
        return self.best.passed

    def report(self) -> str:
        head = (f"--expect: {self.best.label} matches your vectors: every image's cosine >= {EXPECT_COSINE} (min "
                f"{self.best.cosines.min():.6f})" if self.passed else
                f"--expect: no reading matches your vectors (each image's cosine >= {EXPECT_COSINE}); the closest is "
                f"{self.best.label}, min {self.best.cosines.min():.6f}, mean {self.best.cosines.mean():.6f}: check "
                "the checkpoint is the model that wrote the vectors, its head, and the eval transform the vectors "
                "were made with")
        return "\n".join([head, *(f"  tried {r.line()}" for r in self.tried)])


def check_entry(entry: dict, embedding_dim: int, base_dir: Path, vectors: np.ndarray,
                pixels: list[torch.Tensor], device: str = "cpu") -> Reading:
    """One entry as written, served on the images and compared."""
    from ..models.towers import load_tower

    spec = spec_of(entry, embedding_dim, base_dir)
    tower = load_tower(spec, embedding_dim, device)
    return Reading(entry, cosines(served_vectors(spec, tower, pixels, device), vectors), "the entry as written")


def choose_reading(choices: Sequence[dict], sources: dict, embedding_dim: int, base_dir: Path,
                   vectors: np.ndarray, pixels: list[torch.Tensor], device: str = "cpu",
                   describe=str) -> ExpectResult:
    """The first reading that matches the user's vectors: every backbone reading the keys fit (with the
    preprocessing as proposed), then, on the closest of them, every preprocessing nothing beside the file said
    (`sources` names the fields something did); else the closest of all."""
    from ..models.towers import load_tower

    tried: list[Reading] = []
    loaded = []
    for number, entry in enumerate(choices, 1):
        say(f"--expect: serving reading {number}/{len(choices)} ({describe(entry)}) on {len(pixels)} images")
        spec = spec_of(entry, embedding_dim, base_dir)
        tower = load_tower(spec, embedding_dim, device)
        reading = Reading(entry, cosines(served_vectors(spec, tower, pixels, device), vectors), describe(entry))
        tried.append(reading)
        loaded.append((reading, tower))
        if reading.passed:
            return ExpectResult(reading, tried)
    best, tower = max(loaded, key=lambda item: item[0].cosines.mean())
    say(f"--expect: no reading matches as proposed; trying the preprocessing nothing beside the file said on "
        f"{best.label}")
    for image in _preprocessing_variants(best.entry["image"], sources):
        entry = {**best.entry, "image": image}
        spec = spec_of(entry, embedding_dim, base_dir)
        reading = Reading(entry, cosines(served_vectors(spec, tower, pixels, device), vectors),
                          f"{describe(entry)}, image {_image_label(image)}")
        tried.append(reading)
        if reading.passed:
            return ExpectResult(reading, tried)
    return ExpectResult(max(tried, key=lambda r: (r.cosines.min(), r.cosines.mean())), tried)


def _preprocessing_variants(image: dict, sources: dict) -> Iterator[dict]:
    """Every preprocessing to try, the fields something beside the file said kept as they are: resize, crop,
    interpolation, mean/std; the proposed one is tried already."""
    resizes = [image.get("resize")] if "resize" in sources else ["squash", "shorter_side_center_crop"]
    crops = [image.get("crop_pct")] if "crop_pct" in sources or "resize" in sources else list(CROPS)
    interpolations = [image.get("interpolation")] if "interpolation" in sources else ["bicubic", "bilinear"]
    norms = [(image.get("mean"), image.get("std"))] if {"mean", "std"} <= set(sources) else \
        [(image.get("mean"), image.get("std")), *(n for n in NORMS.values() if list(n[0]) != image.get("mean"))]
    for resize, crop, interpolation, (mean, std) in itertools.product(resizes, crops, interpolations, norms):
        variant = {**image, "resize": resize, "interpolation": interpolation, "mean": mean, "std": std}
        variant.pop("crop_pct", None)
        if crop is not None:
            variant["crop_pct"] = crop
        if variant != image:
            yield variant


def _image_label(image: dict) -> str:
    norm = next((name for name, (mean, _) in NORMS.items() if list(mean) == list(image.get("mean") or [])),
                str(image.get("mean")))
    crop = f", crop_pct {image['crop_pct']}" if image.get("crop_pct") else ""
    return f"{image.get('resize')}{crop}, {image.get('interpolation')}, {norm} mean/std"


EXPECT_SUFFIX = ".expect.npy"  # beside a tower's checkpoint: its user's vectors for the bundled sample images


def expect_file(spec: NetworkSpec) -> Path | None:
    """The vectors file that sits beside a tower's checkpoint, if one does: `NAME.expect.npy` beside `NAME.*` (the
    checkpoint's first file), or `expect.npy` in its save_pretrained folder."""
    if spec.checkpoint is None:
        return None
    first = spec.checkpoint[0] if isinstance(spec.checkpoint, tuple) else spec.checkpoint
    candidate = first / "expect.npy" if first.is_dir() else first.with_name(first.name.split(".")[0] + EXPECT_SUFFIX)
    return candidate if candidate.is_file() else None


def check_beside(manifest, device: str = "cpu") -> list[tuple[str, Reading]]:
    """Every tower of a loaded manifest whose checkpoint has its user's vectors beside it, checked on the bundled
    sample images (what the Kaggle notebook runs in its interactive session): (tower name, reading)."""
    found = [(spec, path) for spec in manifest.towers if isinstance(spec, NetworkSpec)
             if (path := expect_file(spec)) is not None]
    if not found:
        return []
    ids, pixels = read_images(None)
    base = manifest.path.resolve().parent
    return [(spec.name, check_entry(spec.to_dict(base), manifest.embedding_dim, base, read_vectors(path, ids), pixels,
                                    device)) for spec, path in found]
