"""Export a training checkpoint as a frozen tower: fp16 safetensors of the EMA weights + its manifest entry.

The entry carries everything inference needs (library, arch, head, preprocessing, native resolution, TTA
resolutions, sha256), taken from the checkpoint itself, so the served tower is the trained one with the trained
preprocessing. A ready-to-run `weights_manifest.yaml` (this tower plus the fallback vector) is written beside it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors.torch import save as safetensors_bytes

from ..fileio import atomic_open, sha256_file
from ..manifest import write_manifest
from ..resources import DEFAULT_MANIFEST, PRIOR_PATH
from .checkpoint import CheckpointError, read_checkpoint

FALLBACK = PRIOR_PATH


class ExportError(CheckpointError):
    """A file that is not a kaggle_i2p training checkpoint, or an export that would not load."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_checkpoint` wrote."""

    weights: Path
    entry: Path  # the tower's manifest entry alone, to paste into an ensemble manifest
    manifest: Path  # a complete manifest: this tower + the fallback
    sha256: str
    used_ema: bool


EXPORT_MARKER = "# written by kaggle-i2p export; an export into this folder replaces it\n"


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, name: str | None = None,
                      resolutions: list[int] | None = None, hflip: bool | None = None,
                      use_ema: bool = True) -> ExportResult:
    """Write OUT/<name>.safetensors (fp16; the EMA weights unless `use_ema` is False or there is no EMA),
    OUT/<name>.yaml (its manifest entry, sha256 included) and OUT/weights_manifest.yaml; resolutions/hflip override
    the TTA views the tower is served with."""
    state = read_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    manifest_path = out_dir / DEFAULT_MANIFEST
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

