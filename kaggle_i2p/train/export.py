"""Export a training checkpoint as a frozen tower: fp16 safetensors of the EMA weights + its manifest entry.

The entry carries everything inference needs (library, arch, head, preprocessing, native resolution, TTA
resolutions, sha256), taken from the checkpoint itself, so the served tower is the trained one with the trained
preprocessing. A ready-to-run `weights_manifest.yaml` (this tower plus the fallback vector) is written beside it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors.torch import save as safetensors_bytes

from ..core.fileio import atomic_open, sha256_file, staging_dir
from ..core.resources import DEFAULT_MANIFEST, PRIOR_PATH
from ..manifest import write_manifest
from ..models.backbones import library
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


def _is_export(path: Path) -> bool:
    """A file `kaggle-i2p export` wrote (a manifest or entry starting with its marker)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read(len(EXPORT_MARKER)) == EXPORT_MARKER


def check_export_destination(out_dir: Path, names: list[str]) -> None:
    """Before anything is written: `out_dir` is new, empty, or a folder an export wrote (its weights_manifest.yaml
    carries the marker); and no file the export writes would replace a file of the user's."""
    if out_dir.is_file():
        raise ExportError(f"--out {out_dir} is a file; give a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    manifest = out_dir / DEFAULT_MANIFEST
    if not (manifest.is_file() and _is_export(manifest)):
        raise ExportError(f"--out {out_dir} holds files that `kaggle-i2p export` did not write (it has no "
                          f"{DEFAULT_MANIFEST} of an export); nothing in it is replaced: choose a new or empty folder")
    foreign = [n for n in names if n.endswith(".yaml") and (out_dir / n).is_file() and not _is_export(out_dir / n)]
    if foreign:
        raise ExportError(f"--out {out_dir}: {', '.join(foreign)} was not written by `kaggle-i2p export` and would be "
                          "replaced; choose another --out folder or --name")


def export_fallback(embedding_dim: int, fallback: str | Path | None) -> Path:
    """The fallback vector the export's manifest carries: `fallback` (a .npy of `embedding_dim` values, checked now),
    else the package's mean prompt embedding, which is MiniLM's 384-d: a tower of another width needs its own."""
    from ..manifest import load_fallback

    if fallback is None:
        if embedding_dim != 384:
            raise ExportError(f"this tower predicts {embedding_dim}-d targets and the package's fallback vector is "
                              "384-d (MiniLM); pass --fallback FILE, a .npy of "
                              f"{embedding_dim} values (e.g. the mean of your training targets: python -c \"import "
                              "numpy as np; t = np.load('WORK/targets.npy', mmap_mode='r'); "
                              "np.save('fallback.npy', t[:100000].astype('float64').mean(0))\")")
        return FALLBACK
    path = Path(fallback)
    try:
        load_fallback(path, embedding_dim)
    except (ValueError, OSError) as err:
        raise ExportError(f"--fallback {path}: {err}") from err
    return path


def check_export_entry(entry: dict, embedding_dim: int, checkpoint: Path, fallback: Path = FALLBACK) -> None:
    """Before anything is written: the entry the export will carry (with --name, --resolutions, --hflip applied)
    parses and its architecture runs at every resolution on the meta device, so an export never writes a manifest
    that then fails validation (a resolution the patch size does not divide, a name a manifest refuses)."""
    from ..manifest import ManifestError, parse_manifest
    from ..models.towers import architecture_problems

    data = {"embedding_dim": embedding_dim, "fallback": str(Path(fallback).resolve()),
            "towers": [{"checkpoint": f"{entry.get('name')}.safetensors", **entry}]}  # the file it will write
    try:
        manifest = parse_manifest(data, checkpoint.parent / DEFAULT_MANIFEST, check_files=False)
        problems = architecture_problems(list(enumerate(manifest.towers)), embedding_dim)
    except ManifestError as err:
        problems = list(err.problems)
    if problems:
        options = {"image.resolutions": "--resolutions", ".name": "--name", "image.hflip": "--hflip"}
        hints = sorted({flag for field, flag in options.items() for p in problems if field in p.split(":", 1)[0]})
        raise ExportError(f"the export of {checkpoint.name} would not serve, so nothing was written"
                          + (f" (check {', '.join(hints)})" if hints else "") + ":\n  - " + "\n  - ".join(problems))


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, name: str | None = None,
                      resolutions: list[int] | None = None, hflip: bool | None = None,
                      use_ema: bool = True, fallback: str | Path | None = None) -> ExportResult:
    """Write OUT/<name>.safetensors (fp16; the EMA weights unless `use_ema` is False or there is no EMA),
    OUT/<name>.yaml (its manifest entry, sha256 included) and OUT/weights_manifest.yaml with its fallback vector
    beside it (`fallback`, else the package's 384-d one); resolutions/hflip override the TTA views the tower is
    served with.

    Only into a new or empty folder, or one an export wrote. Every file is made in a staging folder beside it and
    validated there, then moved in (the manifest last): a failed export changes nothing."""
    state = read_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    entry = dict(state["tower"])
    entry["image"] = dict(entry["image"])
    if name is not None:
        entry["name"] = name
    if resolutions:
        entry["image"]["resolutions"] = [int(r) for r in resolutions]
    if hflip is not None:
        entry["image"]["hflip"] = bool(hflip)
    embedding_dim = int(state.get("embedding_dim", 384))
    fallback_path = export_fallback(embedding_dim, fallback)
    check_export_entry(entry, embedding_dim, Path(checkpoint), fallback_path)
    # a model-config file (open_clip's .json) travels along: its library says whether `arch` is one
    config = Path(entry["arch"]) if library(entry["library"]).arch_is_path(entry["arch"]) else None
    names = [f"{entry['name']}.safetensors", f"{entry['name']}.yaml", DEFAULT_MANIFEST, fallback_path.name,
             *([config.name] if config else [])]
    check_export_destination(out_dir, names)
    staging = staging_dir(out_dir)
    try:
        result = _write_export(state, checkpoint, staging, entry, config, use_ema, fallback_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        for file_name in names:  # the manifest last: a folder with a manifest is a whole export
            if file_name != DEFAULT_MANIFEST:
                os.replace(staging / file_name, out_dir / file_name)
        os.replace(staging / DEFAULT_MANIFEST, out_dir / DEFAULT_MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir / result.weights.name, out_dir / result.entry.name, out_dir / DEFAULT_MANIFEST,
                        result.sha256, result.used_ema)


def _write_export(state: dict, checkpoint: str | Path, folder: Path, entry: dict, config: Path | None,
                  use_ema: bool, fallback: Path = FALLBACK) -> ExportResult:
    """Every file of an export written into `folder`, the manifest validated there."""
    if config is not None:
        shutil.copyfile(config, folder / config.name)
        entry["arch"] = config.name
    used_ema = use_ema and state.get("ema") is not None
    weights = state["ema"] if used_ema else state["model"]
    if state.get("adapters"):  # saved mid-way through a LoRA stage: merged into the weights, a plain tower
        weights = _merged(state, weights, "ema" if used_ema else "model", checkpoint)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    weights_path = folder / f"{entry['name']}.safetensors"
    with atomic_open(weights_path, "wb") as handle:
        handle.write(safetensors_bytes(half, metadata={"source": Path(checkpoint).name,
                                                       "weights": "ema" if used_ema else "model"}))
    digest = sha256_file(weights_path)
    entry = {"name": entry.pop("name"), "library": entry.pop("library"), "arch": entry.pop("arch"),
             "checkpoint": weights_path.name, "sha256": digest, **entry}
    manifest = {"embedding_dim": int(state.get("embedding_dim", 384)), "fallback": fallback.name, "towers": [entry]}
    shutil.copyfile(fallback, folder / fallback.name)
    manifest_path = folder / DEFAULT_MANIFEST
    write_manifest(manifest, manifest_path, header=EXPORT_MARKER)  # validated first: fail here, not on Kaggle
    entry_path = folder / f"{entry['name']}.yaml"
    with atomic_open(entry_path, "w", encoding="utf-8") as handle:  # a tower entry, not a manifest
        handle.write(EXPORT_MARKER)
        yaml.safe_dump(entry, handle, sort_keys=False)
    return ExportResult(weights_path, entry_path, manifest_path, digest, used_ema)


def _merged(state: dict, weights: dict, part: str, checkpoint: str | Path) -> dict:
    """A plain tower's weights from a checkpoint taken during a LoRA stage: its base weights with the adapters merged
    in by peft (`lora.merged_weights`), the tower built from the checkpoint's own entry."""
    import importlib.util

    from ..core.validate import Problems
    from ..manifest import ParseContext, parse_tower
    from ..models.towers import tower_from_state
    from .lora import merged_weights

    if importlib.util.find_spec("peft") is None:
        raise ExportError(f"{checkpoint} was taken during a LoRA stage: merging its adapters needs peft (pip install "
                          "peft), or export the checkpoint written at the stage's end")

    problems = Problems()
    spec = parse_tower(dict(state["tower"]), 0, ParseContext(Path(checkpoint).resolve().parent, problems,
                                                             check_files=False, needs_checkpoint=False), label="tower")
    if spec is None or problems.items:
        raise ExportError(f"{checkpoint}: its tower entry no longer parses ({'; '.join(problems.items)})")
    tower = tower_from_state(spec, weights, int(state.get("embedding_dim", 384)))
    adapters = state["adapters"]
    return merged_weights(tower, weights, adapters[part], adapters["layout"])
