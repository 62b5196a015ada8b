"""`kaggle-i2p inspect CKPT`: a checkpoint a user's own code saved, read as a tower entry from its keys and shapes
alone (no weight read). How a user brings a tower.

1. Read the keys and shapes (`checkpoints.checkpoint_shapes`: safetensors header, or a memory-mapped torch file;
   Lightning's and other wrappers unwrapped), or recognise an exported program.
2. Find the head: a Linear to the embedding width, or an MLP ending in one (its layers renamed to ours when its
   indices differ, as a Dropout between them shifts them), or none.
3. Ask every registered library for its readings of the rest (`BackboneLibrary.propose`: timm ViT/EVA/ConvNeXt/Swin,
   open_clip ViT/ConvNeXt, HF CLIP/SigLIP/BLIP-2 from the config saved beside the file, exported programs).
4. Keep the first reading whose whole entry the file fits (`towers.checkpoint_fit`, the same check `validate-manifest
   --deep` makes, every key filled); say what the keys cannot tell (mean/std, resize, the head's activation).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import I2PError
from ..core.progress import say
from ..core.registry import LIBRARIES
from ..manifest import DEFAULT_EMBEDDING_DIM, parse_entry
from .backbones.base import Candidate, Shapes
from .checkpoints import (
    Source,
    TowerLoadError,
    WeightSetsError,
    checkpoint_shapes,
    is_ema,
    part_file,
    weight_sets,
)
from .safe_load import UnsafeFileError, load_pickled, metadata_objects
from .towers import checkpoint_fit, validate_manifest

# Keys inside a backbone's blocks are never the tower's head, whatever their shape (a ViT-S is 384 wide).
BLOCK_KEY = re.compile(r"(^|\.)(blocks|resblocks|layers?|stages|encoder|trunk|transformer)\.")

TOWER_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # what a manifest takes as a tower's name

RESIZE_CHOICES = ("squash (resize the whole image to the square, as most trainers did)",
                  "shorter_side_center_crop (shorter side to the size, then the centre, as CLIP's transform)")
INTERPOLATIONS = "bicubic (timm, open_clip, HF CLIP), bilinear (torchvision's default), area (OpenCV's INTER_AREA)"


class InspectError(I2PError, ValueError):
    """A file inspect cannot read as a tower: it names what it found and what to pass."""


@dataclass(frozen=True)
class HeadGuess:
    """One reading of the file's head: the entry's `head:`, the width it takes, its keys, and the renames (an
    MLP's layer indices to ours) it needs."""

    head: dict
    in_dim: int | None
    keys: frozenset[str]
    rename: dict[str, str] = field(default_factory=dict)
    text: str = ""


@dataclass
class Inspection:
    """What inspect found: the tower entry (paths absolute), what it recognised, and what the user must confirm."""

    entry: dict
    found: list[str]
    ask: list[str]
    # the other complete entries the keys fit equally, which serve differently (pooling, final norm, features):
    # never chosen silently; `--expect` chooses by the user's own vectors
    alternatives: list[dict] = field(default_factory=list)

    def text(self) -> str:
        """The entry as YAML under comments saying what was recognised and what to confirm."""
        lines = [f"# {line}" for line in self.found]
        if self.alternatives:
            lines.append(f"# The keys fit {len(self.alternatives) + 1} readings that serve differently; the keys "
                         "cannot tell which was trained (pass --expect VECTORS to choose by your model's own outputs):")
            lines += [f"#   {describe_choice(entry)}" for entry in [self.entry, *self.alternatives]]
        if self.ask:
            lines.append("# Not in the file; confirm as trained (the usual values are filled in):")
            lines += [f"#   {line}" for line in self.ask]
        body = yaml.safe_dump([self.entry], sort_keys=False, default_flow_style=None, width=120)
        return "\n".join(lines) + "\n" + body

    sources: dict = field(default_factory=dict)  # image field -> where its value came from

    @property
    def choices(self) -> list[dict]:
        """Every entry the keys fit: the printed one first, then the alternatives."""
        return [self.entry, *self.alternatives]

    def chosen(self, entry: dict, report: str) -> Inspection:
        """This inspection with `entry` kept (by `--expect`), the alternatives settled and the check's report."""
        return Inspection(entry, [*self.found, *report.splitlines()], [a for a in self.ask if "image." not in a
                                                                      or entry["image"] == self.entry["image"]],
                          [], self.sources)


CHOICE_FIELDS = ("features", "backbone", "native_resolution")  # what keys cannot show between readings of one arch


def describe_choice(entry: dict) -> str:
    """One reading by the fields that set it apart: `backbone {global_pool: avg}`, `features cls`."""
    parts = [f"{key} {yaml.safe_dump(entry[key], default_flow_style=True).strip()}" for key in CHOICE_FIELDS
             if key in entry]
    return ", ".join(parts) or "the library's defaults"


def head_guesses(shapes: Shapes, embedding_dim: int) -> list[HeadGuess]:
    """Readings of the file's head, most specific first: each Linear (or MLP ending in one) to the embedding width
    outside the backbone's blocks, then none (the backbone gives the embedding)."""
    guesses = []
    for key, shape in sorted(shapes.items(), key=lambda item: (item[0].count("."), item[0])):
        if not ((key.endswith(".weight") or key == "weight") and len(shape) == 2 and shape[0] == embedding_dim) \
                or BLOCK_KEY.search(key):
            continue
        module = key[: -len(".weight")] if key != "weight" else ""  # "": a Linear's state dict saved alone
        parent, _, last = module.rpartition(".")
        guess = _mlp_guess(shapes, parent, int(last), embedding_dim) if last.isdigit() and parent else None
        if guess is None:
            bias_key = f"{module}.bias" if module else "bias"
            bias = bias_key in shapes
            guess = HeadGuess({"type": "linear", **({} if bias else {"bias": False})}, shape[1],
                              frozenset({key, bias_key} & set(shapes)),
                              text=f"Linear({shape[1]} -> {embedding_dim}{'' if bias else ', no bias'}) "
                                   f"`{module or 'a file of its own'}`")
        guesses.append(guess)
    guesses.append(HeadGuess({"type": "none"}, None, frozenset(), text="none: the backbone gives the embedding"))
    return guesses


def _mlp_guess(shapes: Shapes, parent: str, last: int, embedding_dim: int) -> HeadGuess | None:
    """An nn.Sequential head under `parent` (Linear, norm, activation per hidden size, then the output Linear) as
    our MLP head, with the renames its layer indices need; None when it is not one."""
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if key.startswith(f"{parent}."):
            index, _, name = key[len(parent) + 1:].partition(".")
            if not index.isdigit() or "." in name:
                return None
            layers.setdefault(int(index), {})[name] = shape
    linears = [i for i in sorted(layers) if len(layers[i].get("weight", ())) == 2]
    norms = [i for i in sorted(layers) if i not in linears]
    kinds = {"batchnorm" if "running_mean" in layers[i] else "layernorm" for i in norms}
    if not linears or linears[-1] != last or len(kinds) > 1 or (norms and len(norms) != len(linears) - 1):
        return None
    hidden = [layers[i]["weight"][0] for i in linears[:-1]]
    bias = "bias" in layers[last]
    ours = {i: 3 * h for h, i in enumerate(linears[:-1])} | {i: 3 * h + 1 for h, i in enumerate(norms)}
    ours[last] = 3 * len(hidden)
    rename = {f"{parent}.{i}.": f"{parent}.{j}." for i, j in sorted(ours.items()) if i != j}
    keys = frozenset(k for k in shapes if k.startswith(f"{parent}."))
    first = layers[linears[0]]["weight"][1]
    if not hidden:
        head = {"type": "linear", **({} if bias else {"bias": False})}
        return HeadGuess(head, first, keys, rename, f"Linear({first} -> {embedding_dim}) `{parent}.{last}`")
    norm = kinds.pop() if kinds else "none"
    head = {"type": "mlp", "hidden": hidden[0] if len(hidden) == 1 else hidden, "norm": norm, "activation": "relu",
            **({} if bias else {"bias": False})}
    widths = " -> ".join(str(w) for w in [first, *hidden, embedding_dim])
    return HeadGuess(head, first, keys, rename, f"MLP {widths} with {norm} `{parent}`")


def describe_file(path: Path, top: Any = None) -> str:
    """How the file holds its tensors: flat, inside a wrapper (Lightning's `state_dict`, `{'model': ...}`), or in
    several sets (timm's train.py: `state_dict` and `state_dict_ema`); a folder by the file it reads. `top`: the
    file's unpickled top level when it was read already (`_saved`), so it is not read again."""
    if path.is_dir():
        return f"a save_pretrained folder ({part_file(path).name})"
    if path.suffix == ".safetensors":
        return "a safetensors file"
    if path.name.endswith(".index.json"):
        return "a sharded checkpoint's index"
    if (lib := _program_library(path)) is not None:
        return f"a {lib.label} program"
    import torch

    try:
        top = load_pickled(path, mmap=True) if top is None else top
    except Exception:  # noqa: BLE001 - only for the description; the keys were read already
        return f"a {path.suffix} file"
    if not isinstance(top, Mapping) or all(isinstance(v, torch.Tensor) for v in top.values()):
        return f"a flat {path.suffix} state dict"
    sets = list(weight_sets(top))
    lightning = any(k.startswith("pytorch-lightning") or k in ("lr_schedulers", "callbacks") for k in top)
    timm = "state_dict_ema" in sets or ("arch" in top and "state_dict" in sets and "optimizer" in top)
    kind = "a Lightning checkpoint" if lightning else "timm's train.py checkpoint" if timm else "a wrapped checkpoint"
    metadata = metadata_objects(top)
    return (f"{kind} (tensors under {', '.join(f'`{k}`' for k in sets) or '?'})"
            + (f"; not unpickled: {', '.join(metadata)}" if metadata else ""))


def _program_library(path: Path) -> Any:
    """The registered library whose program this file is (torch.export, TorchScript, ONNX), or None."""
    return next((lib for lib in LIBRARIES if lib.is_program_file(path)), None) if path.is_file() else None


def _describe(parts: tuple[Path, ...], saved: Mapping[Path, Any]) -> str:
    return " + ".join(f"{p.name}: {describe_file(p, saved.get(p))}" for p in parts)


def _read_shapes(source: Source, select: str | None = None
                 ) -> tuple[dict[str, tuple[int, ...]], Exception | None, str | None]:
    """The checkpoint's keys and shapes, why they could not be read (perhaps a program, which its library
    recognises; else the reason is the message), and the set of weights read from a file holding several: the one
    the trainer's own loader serves (an EMA), named in the entry, never a silent choice."""
    try:
        return {k: tuple(v.shape) for k, v in checkpoint_shapes(source, select).items()}, None, select
    except WeightSetsError as err:  # several sets: read the one the trainer's own loader serves
        return _read_shapes(source, err.preferred) if select is None else ({}, err, select)
    except Exception as err:  # noqa: BLE001 - not a state dict: perhaps a program, which its library recognises
        return {}, err, select


def _unreadable(source: Path, err: Exception | None) -> str:
    """Why a file that no library recognises could not be read, in one line: what it is and what would be."""
    if isinstance(err, (UnsafeFileError, TowerLoadError)) and not str(err).startswith(str(source)):
        return str(err)
    size = source.stat().st_size if source.is_file() else 0
    what = "an empty file" if size == 0 else f"{size:,} bytes"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] if err else []
    reason = f"{type(err).__name__}: {lines[0][:200]}" if err and lines else (type(err).__name__ if err else "")
    return (f"{source.name} ({what}) cannot be read as weights or a program ({reason}); inspect reads a safetensors "
            "file, a torch.save state dict (.pt/.pth/.bin/.ckpt, any wrapper), an exported program (.pt2) or a "
            "TorchScript file: copy the file again if it was cut short")


def _saved(parts: tuple[Path, ...]) -> dict[Path, Any]:
    """The unpickled top level of each torch.save file among the parts, by its path: the metadata a trainer keeps
    beside the weights (timm's train.py: its run's arguments), read by the allow-list (nothing of it run), once."""
    saved = {}
    for part in parts:
        try:
            path = part_file(part)
            if path.suffix != ".safetensors" and not path.name.endswith(".index.json") \
                    and _program_library(path) is None:
                saved[path] = load_pickled(path, mmap=True)
        except Exception:  # noqa: BLE001 - a description only; the weights were read (or refused) already
            continue
    return saved


def _preprocessing(candidate: Candidate, saved: Mapping[Path, Any]) -> Candidate:
    """The candidate's image fields with what the training file itself says (its trainer's run arguments) over what
    the arch or a config beside it says, and the sources of each."""
    lib = LIBRARIES.get(candidate.entry["library"])
    image, sources = dict(candidate.image), dict(candidate.sources)
    for path, obj in saved.items():
        found, said = lib.saved_preprocessing(obj, path.name)
        image, sources = {**image, **found}, {**sources, **said}
    return candidate._replace(image=image, sources=sources)


def _entry(candidate: Candidate, head: HeadGuess, parts: tuple[Path, ...], name: str, select: str | None) -> dict:
    """The whole tower entry of one reading."""
    lib = LIBRARIES.get(candidate.entry["library"])
    entry: dict[str, Any] = {"name": name, **candidate.entry}
    if parts and (not lib.holds_weights or head.head["type"] != "none"):
        entry["checkpoint"] = str(parts[0]) if len(parts) == 1 else [str(p) for p in parts]
    rules = {**({"weights": select} if select else {}), **({"rename": dict(head.rename)} if head.rename else {})}
    if rules:
        entry["checkpoint_keys"] = rules
    entry["head"] = head.head
    entry["image"] = {"resize": "squash", **candidate.image}  # squash when nothing says otherwise (asked)
    entry["weight"] = 1.0
    return {k: entry[k] for k in ("name", "library", "arch", "checkpoint", "native_resolution", "features",
                                  "backbone", "checkpoint_keys", "head", "image", "weight") if k in entry}


def _fit(entry: dict, embedding_dim: int, folder: Path) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(problems, notes) of the file against one whole entry; None when the entry itself does not parse. When one
    prefix rename makes the file fit (a module saved under another name: `vision.` for `vision_model.`), the rename
    goes into the entry's `checkpoint_keys` and the entry is checked again with it."""
    try:
        spec = parse_entry(entry, embedding_dim, folder / "inspect.yaml")
        fit = checkpoint_fit(spec, embedding_dim)
        if fit.problems and fit.rename and not (entry.get("checkpoint_keys") or {}).get("rename"):
            rules = {**(entry.get("checkpoint_keys") or {}), "rename": dict(fit.rename)}
            renamed = {**entry, "checkpoint_keys": rules}
            again = checkpoint_fit(parse_entry(renamed, embedding_dim, folder / "inspect.yaml"), embedding_dim)
            if not again.problems:
                entry["checkpoint_keys"] = rules
                ((old, new),) = fit.rename.items()
                return (), (*again.notes, f"read as its keys under `{old}` renamed to `{new}` (checkpoint_keys)")
    except Exception:  # noqa: BLE001 - a reading its library cannot build (timm asserts) is not this file's
        return None
    return fit.problems, fit.notes


def _readings(shapes: Shapes, heads: list[HeadGuess], source: Path, library: str | None, arch: str | None
              ) -> Iterator[tuple[Candidate, HeadGuess]]:
    libraries = [LIBRARIES.get(library)] if library else list(LIBRARIES)
    for head in heads:
        rest = {k: v for k, v in shapes.items() if k not in head.keys}
        for lib in libraries:
            for candidate in lib.propose(rest, head.in_dim, source, arch):
                yield candidate, head


def inspect_checkpoint(path: str | Path | list, *, embedding_dim: int = DEFAULT_EMBEDDING_DIM,
                       library: str | None = None, arch: str | None = None, name: str | None = None) -> Inspection:
    """The tower entry a checkpoint fits, found from its keys and shapes: a file (any wrapper, several sets of weights
    too), a save_pretrained/save_model folder, a sharded index, an exported program, or several of those whose keys
    are merged (a backbone and a head saved apart); InspectError naming what was found when none fits."""
    parts = tuple(Path(p).resolve() for p in (path if isinstance(path, (list, tuple)) else [path]))
    for given, part in zip(path if isinstance(path, (list, tuple)) else [path], parts, strict=True):
        if not part.exists():
            raise InspectError(f"{given}: no such file or folder")
    if library is not None and library not in LIBRARIES:
        raise InspectError(f"--library: {LIBRARIES.unknown(library)}")
    if name is not None and not TOWER_NAME.fullmatch(name):
        raise InspectError(f"--name {name!r}: a tower's name is letters, digits, '_', '-' and '.' (it names the tower "
                           f"in logs and cache folders), e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', name) or 'tower'}")
    if arch is not None and (Path(arch).exists() or Path(arch).suffix == ".json"):  # a config file: from here,
        arch = str(Path(arch).resolve())  # not from the checkpoint's folder
    programs = [p for p in parts if _program_library(p) is not None]
    if len(programs) > 1:
        raise InspectError(f"{', '.join(p.name for p in programs)} are all programs: a tower runs one (give the "
                           "program and, if it has one, its head's file)")
    weights = tuple(p for p in parts if p not in programs)  # a program's head, in a file of its own, is its weights
    source = (weights[0] if len(weights) == 1 else weights) if weights else parts[0]
    say(f"inspect: reading the keys and shapes of {' + '.join(p.name for p in parts)}")
    shapes, unread, select = _read_shapes(source) if weights or not programs else ({}, None, None)
    try:
        anchor = programs[0] if programs else part_file(parts[0])  # the file whose folder holds its configs
    except TowerLoadError as err:
        raise InspectError(str(err)) from err
    heads = head_guesses(shapes, embedding_dim)
    stem = parts[0].name if parts[0].is_dir() else parts[0].name.split(".")[0]
    name = name or re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "tower"
    closest: tuple[int, str, list[str]] | None = None
    chosen: Inspection | None = None
    what = parts[0].name if len(parts) == 1 else " + ".join(p.name for p in parts)
    saved = _saved(weights if programs else parts)
    described = _describe(parts, saved) if shapes else f"{parts[0].name}: a program file"
    say(f"inspect: {len(shapes)} tensors, {len(heads)} head(s) found; asking "
        f"{library or ', '.join(LIBRARIES.names())} for the readings they fit")
    try:
        for candidate, head in _readings(shapes, heads, anchor, library, arch):
            say(f"inspect: trying {candidate.entry.get('library')} {candidate.entry.get('arch')}"
                f"{' ' + str(candidate.entry['backbone']) if candidate.entry.get('backbone') else ''}, head "
                f"{head.text}")
            candidate = _preprocessing(candidate, saved)
            entry = _entry(candidate, head, weights if programs else parts, name, select)
            result = _fit(entry, embedding_dim, anchor.parent)
            if result is None:
                continue
            problems, notes = result
            if not problems and chosen is None:
                chosen = _inspection(entry, candidate, head, notes, described, shapes, select)
            elif not problems and _same_model(chosen.entry, entry) and entry not in chosen.choices:
                chosen.alternatives.append(entry)
            elif chosen is None and (closest is None or len(problems) < closest[0]):
                closest = (len(problems), candidate.family, list(candidate.notes or problems))
        if chosen is not None:
            return chosen
    except I2PError as err:  # a library that recognised the family and needs something only the user has, or a
        text = str(err)  # program it cannot read (refused, damaged)
        raise InspectError(text if text.startswith(what) else f"{what}: {text}") from err
    if not shapes:
        raise InspectError(_unreadable(parts[0], unread))
    missing = [f"--{option}" for option, given in (("library", library), ("arch", arch)) if given is None]
    if closest is None:
        given = f" as {library or 'any library'} {arch or ''}".rstrip() if library or arch else ""
        advice = (f"pass {' and '.join(missing)} (the model the training code built)" if missing else
                  "check that --arch is the model the training code built, and --embedding-dim the head's width")
        raise InspectError(f"{what} ({described}, {len(shapes)} tensors) matches no reading inspect "
                           f"knows{given}; {advice}")
    advice = "pass --arch with the model the training code built" if arch is None else \
        "the file is not that model as built: check --arch, or the head's width (--embedding-dim)"
    raise InspectError(f"{what}: closest reading {closest[1]}, but its keys do not fit:\n  - "
                       + "\n  - ".join(closest[2][:8]) + f"\n{advice}")


def _same_model(first: dict, other: dict) -> bool:
    """Whether two fitting entries read the same file as one model (library, arch, head, key rules), differing only
    in what keys cannot show: their alternatives."""
    keys = ("library", "arch", "checkpoint", "checkpoint_keys", "head")
    return all(first.get(k) == other.get(k) for k in keys)


def _inspection(entry: dict, candidate: Candidate, head: HeadGuess, notes: tuple[str, ...], described: str,
                shapes: Shapes, select: str | None) -> Inspection:
    found = [described + (f", {len(shapes)} tensors" if shapes else ""),
             candidate.family, f"head: {head.text}" + (" (its layers renamed to ours)" if head.rename else ""),
             *(f"loaded as: {n.removeprefix('read as ')}" for n in notes)]
    if select:
        found.append(f"weights: `{select}` (checkpoint_keys.weights), "
                     + ("the EMA, as timm's own loader serves it" if is_ema(select) else "the first set it holds")
                     + "; the file holds other sets too: name one of them there to serve it instead")
    image, sources = candidate.image, candidate.sources
    by_source: dict[str, list[str]] = {}
    for key in ("mean", "std", "interpolation", "resize", "crop_pct", "resolutions"):
        if key in sources and (key in image or key == "crop_pct"):
            by_source.setdefault(sources[key], []).append(f"{key} {image.get(key, 'none (no crop)')}")
    found += [f"image: {', '.join(fields)} (from {origin})" for origin, fields in by_source.items()]
    ask = []
    if not {"mean", "std"} <= set(sources):
        ask.append(f"image.mean / image.std: {image['mean']} / {image['std']} (the family's usual; CLIP's "
                   "[0.4815, 0.4578, 0.4082] / [0.2686, 0.2613, 0.2758], ImageNet's [0.485, 0.456, 0.406] / "
                   "[0.229, 0.224, 0.225], SigLIP's 0.5 / 0.5)")
    if "resize" not in sources:
        ask.append(f"image.resize: squash; or {RESIZE_CHOICES[1]}; with image.crop_pct for an eval crop (timm's "
                   "crop_pct, e.g. 0.875; an HF processor's crop_size / size, e.g. 224 / 256)")
    if "interpolation" not in sources:
        ask.append(f"image.interpolation: {image.get('interpolation')}; choices {INTERPOLATIONS}")
    ask += [f"image.resolutions: {image.get('resolutions')} (add more for multi-resolution TTA)", *candidate.notes]
    if head.head.get("type") == "mlp":
        ask.append("head.activation: relu (the keys cannot tell relu from gelu)")
    return Inspection(entry, found, ask, [], dict(sources))


def append_entry(inspection: Inspection, manifest: str | Path, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> bool:
    """Add the entry to a manifest file (its paths relative to the manifest's folder), written atomically after the
    whole manifest, the new tower included, passes `validate-manifest --deep`; the file's comments and formatting are
    kept. A manifest that does not exist yet is started first (`init`, at `embedding_dim`). Returns whether it was
    started."""
    import os

    from ..core.fileio import check_writable_file
    from ..manifest.write import append_tower, edit_manifest, init_manifest

    path = Path(manifest)
    started = not path.exists()
    if started:
        init_manifest(path, embedding_dim=embedding_dim)
    check_writable_file(path)  # a read-only manifest is refused before anything is checked or written
    entry = dict(inspection.entry)
    folder = path.resolve().parent

    def relative(value: str) -> str:
        return os.path.relpath(value, folder) if Path(value).is_absolute() and Path(value).exists() else value

    for key in ("checkpoint", "arch"):  # the files, relative to the manifest's folder as a manifest writes them
        if isinstance(entry.get(key), str):
            entry[key] = relative(entry[key])
        elif isinstance(entry.get(key), list):
            entry[key] = [relative(v) for v in entry[key]]

    def add(data: Any) -> None:
        names = {t.get("name") for t in data["towers"] if isinstance(t, Mapping)}
        if entry["name"] in names:
            raise InspectError(f"{path}: already has a tower named {entry['name']!r}; pass --name")
        append_tower(data, entry)

    try:
        edit_manifest(path, add, check=lambda checked: validate_manifest(checked, deep=True))
    except BaseException:
        if started:  # the manifest this call started goes with the tower it could not add
            path.unlink(missing_ok=True)
        raise
    return started
