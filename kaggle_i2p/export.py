"""Export a training checkpoint as a frozen tower: fp16 safetensors of the EMA weights + its manifest entry.

The entry carries everything inference needs (library, arch, head, preprocessing, native resolution, TTA
resolutions, sha256), taken from the checkpoint itself, so the served tower is the trained one with the trained
preprocessing. A ready-to-run `weights_manifest.yaml` (this tower plus the fallback vector) is written beside it.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from .atomic import atomic_open
from .errors import I2PError
from .manifest import TowerSpec, write_manifest
from .resources import PRIOR_PATH
from .towers import sha256_file

CHECKPOINT_FORMAT = "kaggle_i2p.train/1"
FALLBACK = PRIOR_PATH


class ExportError(I2PError, ValueError):
    """A file that is not a kaggle_i2p training checkpoint, or an export that would not load."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_checkpoint` wrote."""

    weights: Path
    entry: Path  # the tower's manifest entry alone, to paste into an ensemble manifest
    manifest: Path  # a complete manifest: this tower + the fallback
    sha256: str
    used_ema: bool


def tower_entry(spec: TowerSpec) -> dict:
    """A tower spec as manifest data (no checkpoint yet): what a training checkpoint stores and export writes."""
    image = spec.image
    entry = {"name": spec.name, "library": spec.library, "arch": spec.arch,
             "head": {k: v for k, v in asdict(spec.head).items() if v is not None},
             "image": {"mean": list(image.mean), "std": list(image.std), "interpolation": image.interpolation,
                       "resize": image.resize, "resolutions": list(image.resolutions), "hflip": image.hflip},
             "weight": 1.0, "precision": spec.precision}
    if spec.native_resolution is not None:
        entry["native_resolution"] = spec.native_resolution
    if spec.head.type == "linear":
        entry["head"] = {"type": "linear"}
    return entry


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (`last.pt` / `best.pt`), read with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint; the trainer writes OUTPUT/best.pt and OUTPUT/last.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable file becomes one clear error
        raise ExportError(f"{path}: cannot read it as a checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(f"{path}: not a kaggle_i2p training checkpoint (no format {CHECKPOINT_FORMAT!r}); "
                          "frozen tower files go straight into a manifest's checkpoint field")
    return checkpoint


EXPORT_MARKER = "# written by kaggle-i2p export; an export into this folder replaces it\n"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, name: str | None = None,
                      resolutions: list[int] | None = None, hflip: bool | None = None,
                      use_ema: bool = True) -> ExportResult:
    """Write OUT/<name>.safetensors (fp16; the EMA weights unless `use_ema` is False or there is no EMA),
    OUT/<name>.yaml (its manifest entry, sha256 included) and OUT/weights_manifest.yaml; resolutions/hflip override
    the TTA views the tower is served with."""
    state = read_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    manifest_path = out_dir / "weights_manifest.yaml"
    if manifest_path.is_file() and not manifest_path.read_text(encoding="utf-8", errors="replace").startswith(
            EXPORT_MARKER):
        raise ExportError(f"{manifest_path} exists and was not written by `kaggle-i2p export`; it is never "
                          "overwritten: choose another --out folder (then add the tower's entry to your manifest)")
    if out_dir.is_file():
        raise ExportError(f"--out {out_dir} is a file; give a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    entry = dict(state["tower"])
    entry["image"] = dict(entry["image"])
    if name is not None:
        entry["name"] = name
    if resolutions:
        entry["image"]["resolutions"] = [int(r) for r in resolutions]
    if hflip is not None:
        entry["image"]["hflip"] = bool(hflip)
    if entry["arch"].endswith(".json"):  # an open_clip model config travels with the weights
        config = Path(entry["arch"])
        shutil.copyfile(config, out_dir / config.name)
        entry["arch"] = config.name
    used_ema = use_ema and state.get("ema") is not None
    weights = state["ema"] if used_ema else state["model"]
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    weights_path = out_dir / f"{entry['name']}.safetensors"
    with atomic_open(weights_path, "wb") as handle:
        handle.write(safetensors_bytes(half, metadata={"source": Path(checkpoint).name,
                                                       "weights": "ema" if used_ema else "model"}))
    digest = sha256_file(weights_path)
    entry = {"name": entry.pop("name"), "library": entry.pop("library"), "arch": entry.pop("arch"),
             "checkpoint": weights_path.name, "sha256": digest, **entry}
    manifest = {"embedding_dim": int(state.get("embedding_dim", 384)), "fallback": FALLBACK.name, "towers": [entry]}
    shutil.copyfile(FALLBACK, out_dir / FALLBACK.name)
    write_manifest(manifest, manifest_path, header=EXPORT_MARKER)  # validated first: fail here, not on Kaggle
    entry_path = out_dir / f"{entry['name']}.yaml"
    with atomic_open(entry_path, "w", encoding="utf-8") as handle:  # a tower entry, not a manifest
        handle.write(EXPORT_MARKER)
        yaml.safe_dump(entry, handle, sort_keys=False)
    return ExportResult(weights_path, entry_path, manifest_path, digest, used_ema)

