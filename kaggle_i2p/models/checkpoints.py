"""Checkpoint files: read a state dict offline (safetensors, or torch's `weights_only` loader), read only its keys and
shapes, check its sha256 (hashed once per process per file), and describe how its keys differ from a model's."""

from __future__ import annotations

import itertools
import json
import os
import stat
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..core.errors import I2PError
from ..core.fileio import file_identity, sha256_file
from .safe_load import load_pickled

WRAPPER_KEYS = ("state_dict", "model", "ema", "model_ema", "module")


class TowerLoadError(I2PError, RuntimeError):
    """A checkpoint that does not fit its tower, or a file that fails its checksum."""


PROGRAMS = ("export", "torchscript")  # the formats whose file is the model (code and weights), not a state dict


def program_format(path: Path) -> str:
    """What a `.pt`/`.pt2` file holds, read from its zip directory alone: "export" (torch.export.save),
    "torchscript" (torch.jit.save), "pickle" (torch.save of a module or a state dict) or "unknown"."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.split("/", 1)[-1] for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return "unknown"
    if "archive_format" in names:
        return "export"
    if "constants.pkl" in names and any(name.startswith("code/") for name in names):
        return "torchscript"
    return "pickle" if "data.pkl" in names else "unknown"


MAX_INDEX_BYTES = 64 << 20  # a sharded checkpoint's index is a few MB even for a 100-shard model


def shard_files(path: Path) -> list[Path] | None:
    """The files a sharded checkpoint's index names (`model.safetensors.index.json`, `pytorch_model.bin.index.json`:
    what save_pretrained writes for a large model, e.g. BLIP-2), beside it; None for a checkpoint in one file.
    Each shard must be a regular file inside the index's folder (a name that climbs out of it, an absolute path, a
    FIFO or a device is refused, naming the entry), so an index never makes us read another file or block."""
    if not path.name.endswith(".index.json"):
        return None
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes, more than any index")
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise TowerLoadError(f"{path}: not a sharded checkpoint's index (a weight_map of tensor -> file): "
                             f"{err}") from err
    # where shards may be: the index's folder, or (a Hugging Face cache, whose files are links into blobs/) the
    # folder of the file the index links to
    folders = {path.parent.resolve(), path.resolve().parent}
    shards = []
    for name in names:
        if not isinstance(name, str) or not name or Path(name).is_absolute() or "\0" in name:
            raise TowerLoadError(f"{path}: weight_map names {name!r}, which is not a file name beside the index")
        shard = (path.parent / name)
        resolved = shard.resolve()
        if os.path.normpath(name).startswith("..") or not any(resolved.parent == f or f in resolved.parents
                                                               for f in folders):
            raise TowerLoadError(f"{path}: weight_map names {name!r}, which resolves to {resolved}, outside the "
                                 f"index's folder {path.parent.resolve()}; a shard must sit beside its index")
        if not shard.exists():
            raise TowerLoadError(f"{path}: weight_map names {name!r}, which is not in {path.parent}; copy every shard "
                                 "the index lists beside it")
        if not stat.S_ISREG(shard.stat().st_mode):
            raise TowerLoadError(f"{path}: weight_map names {name!r}, which is not a regular file (a FIFO, device or "
                                 "folder); a shard must be a weights file")
        shards.append(shard)
    return shards


Source = Path | tuple[Path, ...]  # a checkpoint: a file, a save_pretrained/save_model folder, or several merged

# A save_pretrained / save_model / push_to_hub folder's weights, in the order transformers and accelerate look for
# them (a sharded model's index first); open_clip's hub layout last.
FOLDER_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                  "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightSetsError(TowerLoadError):
    """A file holding more than one set of weights (a model and its EMA) read without saying which: never a silent
    choice. `preferred`: the set the trainer's own loader serves (`preferred_weights`), which the message proposes."""

    def __init__(self, message: str, preferred: str) -> None:
        super().__init__(message)
        self.preferred = preferred

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.preferred)  # picklable, as errors crossing a worker process must be


def source_parts(source: Source | list) -> tuple[Path, ...]:
    """The paths a checkpoint names: one, or each of a list (merged when read)."""
    return tuple(Path(p) for p in source) if isinstance(source, (tuple, list)) else (Path(source),)


def part_file(part: Path) -> Path:
    """The file a part of a checkpoint reads: the file itself, or a save_pretrained/save_model folder's weights file
    (a sharded model's index); TowerLoadError naming what the folder holds when it has none."""
    if not part.is_dir():
        return part
    found = next((part / name for name in FOLDER_WEIGHTS if (part / name).is_file()), None)
    if found is None:
        held = sorted(p.name for p in part.iterdir())
        raise TowerLoadError(f"{part} is a folder without weights ({' or '.join(FOLDER_WEIGHTS[:4])}, as "
                             f"save_pretrained and accelerate's save_model write); it holds: "
                             f"{', '.join(held[:8]) or 'nothing'}{' ...' if len(held) > 8 else ''}")
    return found


def weight_files(source: Source) -> list[Path]:
    """Every file a checkpoint's weights are read from, in order: each part's file, a sharded index with its shards."""
    files = []
    for part in source_parts(source):
        path = part_file(part)
        files.append(path)
        files += shard_files(path) or []
    return files


def source_identity(source: Source) -> str:
    """The checkpoint's files' identities (path, size, times, inode) joined: any rewrite of any of them changes it."""
    return "|".join(file_identity(f) for f in weight_files(source))


def source_sha256(source: Source, file_sha256=None) -> str:
    """The sha256 a manifest's `sha256` checks: a checkpoint in one file, that file's own (`sha256sum FILE`); in
    several (a folder with a sharded index, a list), the sha256 of their `sha256sum` lines (`sha256sum FILES |
    sha256sum`, each file by its name alone). `file_sha256`: the per-file hasher (memoised by default)."""
    import hashlib

    file_sha256 = file_sha256 or checkpoint_sha256
    files = weight_files(source)
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{file_sha256(f)}  {f.name}\n" for f in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def _state_like(value: object) -> bool:
    """A mapping of names to tensors (a state dict), as a wrapper holds one."""
    return isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) for k in value) and \
        sum(isinstance(v, torch.Tensor) for v in value.values()) * 2 > len(value)


def weight_sets(obj: object) -> dict[str, Mapping]:
    """The sets of weights a torch.save object holds, by the key that holds each: the object itself ("") when it is a
    state dict; else its values that are state dicts (timm's train.py: `state_dict` and `state_dict_ema`; our
    trainer: `model` and `ema`; Lightning: `state_dict`), looking through one-key wrappers (`{'model': {...}}`)."""
    if not isinstance(obj, Mapping):
        return {}
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"": obj}
    sets = {str(k): v for k, v in obj.items() if _state_like(v)}
    if sets:
        return sets
    inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    return weight_sets(inner) if inner is not None else {}


def choose_weights(obj: object, path: Path, select: str | None) -> Mapping:
    """The one set of weights to read from a loaded file: the only one, or the one `select` names (the entry's
    `checkpoint_keys.weights`); a choice that cannot be made is an error naming the sets, never a silent pick."""
    sets = weight_sets(obj)
    if not sets:
        raise TowerLoadError(f"{path}: holds a {type(obj).__name__}"
                             + (f" with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, Mapping) else "")
                             + ", and no state dict of tensors")
    if select is not None:
        if select not in sets:
            raise KeyRuleError([f"checkpoint_keys.weights: no set of weights under {select!r}; the file holds "
                                f"{', '.join(repr(k) for k in sets) if '' not in sets else 'one flat state dict'}"])
        return sets[select]
    if len(sets) > 1:
        preferred = preferred_weights(sets)
        raise WeightSetsError(f"{path.name} holds {len(sets)} sets of weights ({', '.join(sets)}); say which the "
                              f"tower serves with `checkpoint_keys: {{weights: {preferred}}}`"
                              + (" (the EMA: timm's loader prefers it)" if preferred != next(iter(sets)) else ""),
                              preferred)
    return next(iter(sets.values()))


def preferred_weights(sets: Mapping) -> str:
    """The set a trainer's own loader serves by default: an EMA when there is one (timm's `state_dict_ema`)."""
    return next((k for k in sets if is_ema(k)), next(iter(sets)))


def is_ema(key: str) -> bool:
    """Whether a set of weights, by the key holding it, is an EMA (timm's `state_dict_ema`, our trainer's `ema`)."""
    return "ema" in key.lower()


def _read_file(path: Path, *, shapes: bool, mmap: bool, device: str | torch.device, select: str | None,
               optional: bool = False) -> tuple[dict[str, torch.Tensor], bool, bool]:
    """One weights file's tensors (or meta tensors of their shapes), whether they were its flat top level, and
    whether `select` chose them. `optional` (a part of several): `select` applies only to a file holding several
    sets of weights, and the others read their one set."""
    if path.suffix == ".safetensors":
        if select is not None and not optional:
            raise KeyRuleError([f"checkpoint_keys.weights: a safetensors file holds one set of weights; {select!r} "
                                "names nothing in it: leave it out"])
        if shapes:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {k: torch.empty(tuple(handle.get_slice(k).get_shape()), device="meta")
                        for k in handle.keys()}, True, False  # noqa: SIM118
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device)), True, False
    program = program_format(path)
    if program in PROGRAMS:  # torch.load would hand a TorchScript file to torch.jit.load
        raise TowerLoadError(f"{path}: is a {program} program, not a state dict: serve it as `library: {program}` "
                             "with `arch:` naming it")
    obj = load_pickled(path, "cpu" if shapes else device, mmap or shapes)
    if optional and len(weight_sets(obj)) <= 1:
        select = None
    chosen = choose_weights(obj, path, select)
    tensors = {k: v for k, v in chosen.items() if isinstance(v, torch.Tensor)}
    if shapes:
        tensors = {k: torch.empty(tuple(v.shape), device="meta") for k, v in tensors.items()}
    return tensors, chosen is obj, select is not None


def _read(source: Source, *, shapes: bool, mmap: bool = False, device: str | torch.device = "cpu",
          select: str | None = None) -> tuple[dict[str, torch.Tensor], bool]:
    """A checkpoint's tensors merged over its parts and shards (a key in two files is an error naming both), and
    whether it was one flat file. `select` must name a set in at least one part."""
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    flat, selected = True, select is None
    files = [(f, shard_files(f)) for f in map(part_file, source_parts(source))]
    for path, shards in files:
        for file in shards if shards is not None else [path]:
            # one file: the choice is its own to take; several: only a file holding several sets takes it
            tensors, top, chose = _read_file(file, shapes=shapes, mmap=mmap, device=device, select=select,
                                             optional=len(files) > 1)
            selected = selected or chose
            flat = flat and top
            for key, value in tensors.items():
                if key in merged:
                    raise TowerLoadError(f"key {key!r} is in both {origin[key]} and {file}: a checkpoint's files are "
                                         "merged, so each key may come from one of them; use checkpoint_keys to "
                                         "ignore one")
                merged[key], origin[key] = value, file
    if not selected:
        raise KeyRuleError([f"checkpoint_keys.weights: {select!r} names a set of weights, and none of the "
                            "checkpoint's files holds more than one; leave it out"])
    return merged, flat and len(files) == 1 and len(origin) == len(merged)


def read_state_dict(source: Source, mmap: bool = False, device: str | torch.device = "cpu",
                    select: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors from a checkpoint (`Source`: a .safetensors file, a .pt/.pth/.bin/.ckpt/.pth.tar file via
    `torch.load(weights_only=True)` and the allow-list, a sharded index, a save_pretrained folder, or a list of
    those merged), onto `device` (a GPU reads them straight into its memory) (`mmap`: memory-mapped, nothing read
    until used, for files in torch's zip format). A file holding several sets of weights is read at `select`."""
    return _read(source, shapes=False, mmap=mmap, device=device, select=select)[0]


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP's leading `module.` and `torch.compile`'s `_orig_mod.` (at any depth) from checkpoint keys."""
    cleaned = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        cleaned[key] = value
    return cleaned


def read_weights(source: Source, failure: str, device: str | torch.device = "cpu", select: str | None = None
                 ) -> dict[str, torch.Tensor]:
    """`read_state_dict` + `strip_prefixes`; an unreadable file becomes one TowerLoadError: "{failure} {path}: ..."."""
    try:
        return strip_prefixes(read_state_dict(source, device=device, select=select))
    except I2PError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable files become one clear error
        raise TowerLoadError(f"{failure} {source_label(source)}: {err}") from err


def source_label(source: Source) -> str:
    """A checkpoint as messages name it: its path, or its paths joined with ` + `."""
    return " + ".join(str(p) for p in source_parts(source))


def checkpoint_shapes(source: Source, select: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's keys (prefixes stripped) with meta tensors of their shapes, read without loading weights:
    the safetensors header, or a memory-mapped torch file; every shard, folder and part of a list."""
    return checkpoint_shapes_and_keys(source, select)[0]


def checkpoint_shapes_and_keys(source: Source, select: str | None = None
                               ) -> tuple[dict[str, torch.Tensor], set[str] | None]:
    """`checkpoint_shapes`, and from the same read the keys the checkpoint holds at its top level, nothing unwrapped
    or stripped (None when its top level is not a flat state dict: a wrapper such as Lightning's
    `{'state_dict': ...}`, or several files merged); a sharded checkpoint's, all its shards'."""
    tensors, flat = _read(source, shapes=True, select=select)
    return strip_prefixes(tensors), set(tensors) if flat else None


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of the safetensors file (no metadata) holding exactly these tensors: the same weights give the same
    digest whichever file and layout they were read from."""
    import hashlib

    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    try:
        data = save(tensors)
    except RuntimeError:  # tensors sharing memory (tied weights) are saved as copies
        data = save({k: v.clone() for k, v in tensors.items()})
    return hashlib.sha256(data).hexdigest()


class FileHashes:
    """sha256 of files, memoised in this process by `file_identity`: the deep manifest check, the cache key and the
    load all hash a GB checkpoint once."""

    def __init__(self) -> None:
        self._memo: dict[str, str] = {}

    def __call__(self, path: Path) -> str:
        key = file_identity(path)
        if key not in self._memo:
            self._memo[key] = sha256_file(Path(path))
        return self._memo[key]

    def remember(self, path: Path, digest: str) -> None:
        """Take a hash memoised elsewhere (the cache's file) for this path as it is now."""
        self._memo[file_identity(path)] = digest


checkpoint_sha256 = FileHashes()


def folder_sha256(folder: Path) -> dict[str, str]:
    """Every regular file under `folder` (a text model's folder, a bank's) by its path inside it -> its content's
    sha256, memoised per file as `checkpoint_sha256` is: files rewritten with the same size and modification time are
    still told apart (the status-change time and inode are in the memo's key)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    return {p.relative_to(folder).as_posix(): checkpoint_sha256(p) for p in files}


def content_identity(path: str | Path) -> str | dict[str, str]:
    """What a path contributes to a cache key: a file's sha256, or a folder's files' (`folder_sha256`), each file's
    memoised by path, size, times and inode; so a file rewritten in place is a new identity and a moved one is not.
    A path that is not there is named as missing (a run fails on it elsewhere, with its own message)."""
    path = Path(path)
    if path.is_dir():
        return folder_sha256(path)
    return checkpoint_sha256(path) if path.is_file() else f"missing: {path}"


def sha256_mismatch(source: Source, expected: str | None) -> str | None:
    """The checkpoint's sha256 (`source_sha256`: a file's own, or its files' together) when it is not `expected`,
    else None (also when nothing is expected)."""
    if not expected:
        return None
    actual = source_sha256(source)
    return None if actual.lower() == expected.lower() else actual


def whole_model_problem(expected: Mapping[str, torch.Tensor], checkpoint: Path, what: str, give: str) -> str | None:
    """Why `checkpoint` is not `what` (a whole model: its keys and shapes against `expected`, read without the
    weights), ending in what to `give` when it cannot be read at all; None when it fits."""
    try:
        shapes = checkpoint_shapes(Path(checkpoint))
    except Exception as err:  # noqa: BLE001 - junk bytes, a truncated file, a refused pickle
        lines = [line for line in str(err).splitlines() if line.strip()]
        return (f"{checkpoint} cannot be read as a checkpoint ({type(err).__name__}: {lines[0] if lines else ''}); "
                f"give {give}")
    diff = key_diff(expected, shapes, limit=4)
    return f"{checkpoint} is not {what} (text tower included): " + "; ".join(diff) if diff else None


def key_diff(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], limit: int = 8) -> list[str]:
    """How a checkpoint's keys and shapes differ from a model's, one line each (empty when they fit), with hints."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing key(s): " + ", ".join(missing[:limit]) + (" ..." if len(missing) > limit
                                                                                        else ""))
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(unexpected[:limit])
                     + (" ..." if len(unexpected) > limit else ""))
    for key in mismatched[:limit]:
        lines.append(f"shape mismatch {key}: checkpoint {tuple(got[key].shape)}, model {tuple(expected[key].shape)}")
    if missing and unexpected and all(not k.startswith(("backbone.", "head.")) for k in unexpected[:limit]):
        lines.append("hint: tower checkpoints hold the keys of kaggle_i2p.models.towers.Tower (backbone.*, head.*); "
                     "export with `kaggle-i2p export` or rename the keys")
    if any(k.startswith("backbone.pos_embed") or k.startswith("backbone.positional_embedding") for k in mismatched):
        lines.append("hint: the position embeddings were trained at another size; set native_resolution")
    return lines


def under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` whose keys start with `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class KeyRuleError(TowerLoadError):
    """A manifest's `checkpoint_keys` that cannot be right for this file: a rule that matches no key, or two keys
    made one (which would let one of them win silently); `problems` lists each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def apply_key_rules(state: Mapping[str, torch.Tensor], strip: tuple[str, ...] = (),
                    rename: Mapping[str, str] | None = None, ignore: tuple[str, ...] = ()
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """A manifest's `checkpoint_keys` applied to a checkpoint's keys, in this order: keys starting with an `ignore`
    prefix dropped (counted), a leading `strip` prefix removed, a leading `rename` prefix replaced. Every rule must
    match at least one key, and no two keys may end as one: KeyRuleError lists each that does not hold."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    used: set[tuple[str, str]] = set()
    collisions: list[str] = []
    ignored = 0
    for key, value in state.items():
        original = key
        if ignore and key.startswith(tuple(ignore)):
            ignored += 1
            used.update(("ignore", p) for p in ignore if key.startswith(p))
            continue
        for prefix in strip:
            if key.startswith(prefix):
                key = key[len(prefix):]
                used.add(("strip", prefix))
                break
        for old, new in (rename or {}).items():
            if key.startswith(old):
                key = new + key[len(old):]
                used.add(("rename", old))
                break
        if key in out:
            collisions.append(f"{origin[key]!r} and {original!r} both become {key!r}")
        out[key], origin[key] = value, original
    problems = [f"checkpoint_keys.{rule}: no key of the file starts with {prefix!r} (the file's keys start with "
                f"{_key_starts(state)}; DDP's `module.` and torch.compile's `_orig_mod.` are removed before the "
                "rules, and a wrapper's `state_dict`/`model`/`ema` key is unwrapped)"
                for rule, prefixes in (("ignore", ignore), ("strip", strip), ("rename", tuple(rename or ())))
                for prefix in prefixes if (rule, prefix) not in used]
    if collisions:
        problems.append(f"checkpoint_keys: {len(collisions)} key(s) collide after the rules, so one of each pair "
                        f"would be lost: {'; '.join(collisions[:3])}{' ...' if len(collisions) > 3 else ''}; "
                        "ignore one side or rename onto a free prefix")
    if problems:
        raise KeyRuleError(problems)
    return out, ignored


def _key_starts(state: Mapping[str, torch.Tensor], limit: int = 6) -> str:
    """The distinct first parts of a file's keys, for a message: `backbone.`, `head.`, ..."""
    starts = sorted({k.split(".", 1)[0] + ("." if "." in k else "") for k in state})
    return ", ".join(starts[:limit]) + (" ..." if len(starts) > limit else "") if starts else "(no keys)"


def _fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> bool:
    return set(expected) == set(state)


WRAPPER_MODULE_PREFIXES = ("model.", "net.", "tower.")  # a Lightning module's, or a wrapper module's, attribute


def fit_layout(expected: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor],
               classifier_prefixes: tuple[str, ...] = (), library_layouts=None
               ) -> tuple[dict[str, torch.Tensor], str | None]:
    """A checkpoint in one of the layouts people save towers in, as a tower's `backbone.*`/`head.*` keys, with a
    note naming the layout; the state as given and None when it fits already or no known layout makes it fit (the
    caller reports the difference).

    Each layout must fill every expected key exactly. Under every key a wrapper module's prefix (Lightning's
    `model.`, `net.`, `tower.`) or none, tried in turn: the backbone as it is or nested under one or two attributes
    (`vision.`, `clip.vision_model.`, HF's `vit.`), with the head under its own name or the library's classifier
    (`head.`, `fc.`, `classifier.`); then the library's own layouts (`library_layouts(state, backbone_keys)`:
    open_clip's whole CLIP file, HF's whole CLIP or BLIP-2 model), the rest of such a file left out. When none fits,
    the bare reading (the file's backbone keys under `backbone.`, its head's under `head.`) and None: the difference
    the caller reports is then the one that matters."""
    if _fits(expected, state):
        return state, None
    for candidate, note in _layouts(expected, state, classifier_prefixes, library_layouts):
        if _fits(expected, candidate):
            return candidate, note
    return _bare(state, expected, classifier_prefixes), None  # the closest reading, for the difference's report


def _layouts(expected: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor], classifier_prefixes: tuple[str, ...],
             library_layouts) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
    """The candidate layouts of `fit_layout`, made one at a time (the first that fits ends the search)."""
    backbone_keys = {k[len("backbone."):] for k in expected if k.startswith("backbone.")}
    bases = [(state, "")] + [({k[len(prefix):]: v for k, v in state.items()},
                              f"keys under `{prefix}` (a Lightning or wrapper module); ")
                             for prefix in WRAPPER_MODULE_PREFIXES if all(k.startswith(prefix) for k in state)]
    for base, under_prefix in bases:
        if under_prefix:
            yield base, under_prefix.rstrip("; ")
        for nest in ["", *_nested_prefixes(base, backbone_keys)]:
            inner = {k[len(nest):] if nest and k.startswith(nest) else k: v for k, v in base.items()}
            where = under_prefix + (f"the backbone under `{nest}`, " if nest else "a bare backbone, ")
            yield _bare(inner, expected, classifier_prefixes), where + "the head beside it"
            if library_layouts is not None:
                head = {k: v for k, v in _bare(inner, expected, classifier_prefixes).items() if k.startswith("head.")}
                for part, note in library_layouts(dict(inner), backbone_keys):
                    yield {**{f"backbone.{k}": v for k, v in part.items()}, **head}, where + note


def backbone_layout(backbone: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor],
                    classifier_prefixes: tuple[str, ...] = (), library_layouts=None
                    ) -> tuple[dict[str, torch.Tensor], list[str], str | None] | None:
    """Pretrained weights for a backbone about to be trained, read as `fit_layout` reads a tower (people's wrappers,
    nests, the library's own layouts: a whole HF BLIP-2 or CLIP file, open_clip's CLIP): (the backbone's keys, the
    file's classifier keys left out, a note on the layout or None when the file is a bare backbone), from the first
    reading that fills every backbone key with nothing beside it but a classifier; None when no reading does."""
    expected = {f"backbone.{k}": v for k, v in backbone.items()}
    readings = [(_bare(state, expected, classifier_prefixes), None)]
    for candidate, note in itertools.chain(readings, _layouts(expected, state, classifier_prefixes, library_layouts)):
        body = under(candidate, "backbone.")
        rest = sorted(k for k in candidate if not k.startswith("backbone."))
        if set(body) == set(backbone) and all(k.startswith("head.") for k in rest):
            return body, rest, note
    return None


def _bare(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
          classifier_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Backbone keys under `backbone.`, a classifier's (`fc.`, ...) as the head's, the rest as they are; when the rest
    sit under one other name (`linear.`, `w_head.`, `dense0.`) that holds exactly the head's keys, that is the head."""
    out = {}
    for key, value in state.items():
        classifier = next((p for p in classifier_prefixes if key.startswith(p)), None)
        if f"backbone.{key}" in expected or classifier is None:
            out[f"backbone.{key}" if f"backbone.{key}" in expected else key] = value
        else:
            out[f"head.{key[len(classifier):]}"] = value
    rest = [k for k in out if k not in expected]
    missing = {k for k in expected if k.startswith("head.") and k not in out}
    if not missing:
        return out
    groups: dict[str, list[str]] = {}
    for key in rest:
        if "." in key:
            groups.setdefault(key.split(".", 1)[0], []).append(key)
    named = [g for g, keys in groups.items() if {f"head.{k[len(g) + 1:]}" for k in keys} == missing
             and all(tuple(out[k].shape) == tuple(expected[f"head.{k[len(g) + 1:]}"].shape) for k in keys)]
    if len(named) == 1:  # one other name holds exactly the head's keys (`dense0.`, `w_head.`), whatever else is there
        for old in groups[named[0]]:  # (a whole CLIP file's text tower)
            out[f"head.{old[len(named[0]) + 1:]}"] = out.pop(old)
    elif {f"head.{k}" for k in rest} >= missing:  # the head's own state dict, saved in a file of its own
        for new in missing:  # (nn.Linear's `weight`, `bias`), merged beside the backbone's
            out[new] = out.pop(new[len("head."):])
    return out


def _nested_prefixes(state: Mapping[str, torch.Tensor], backbone_keys: set[str], limit: int = 6) -> list[str]:
    """The leading one- and two-part prefixes (`vision.`, `clip.vision_model.`) under which this file's keys are a
    backbone's, most keys first: only those that uncover at least one backbone key."""
    counts: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for cut in (1, 2):
            if len(parts) > cut and ".".join(parts[cut:]) in backbone_keys:
                prefix = ".".join(parts[:cut]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
        if len(parts) > 2 and ".".join(parts[2:]) in backbone_keys:  # a wrapper around a whole model, whose own
            counts[parts[0] + "."] = counts.get(parts[0] + ".", 0) + 1  # layout (open_clip's `visual.`) is inside
    return sorted(counts, key=lambda p: (-counts[p], p))[:limit]


def suggest_rename(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> dict[str, str] | None:
    """The one leading-prefix rename (`{old: new}`) that makes `got`'s keys `expected`'s, if one does."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if not missing or len(missing) != len(unexpected):
        return None
    for cut in range(1, 4):  # the first 1-3 dotted parts of the unexpected keys, against the missing ones'
        old = {".".join(k.split(".")[:cut]) + "." for k in unexpected}
        if len(old) != 1:
            continue
        (old_prefix,) = old
        for new_prefix in {m[:len(m) - len(u) + len(old_prefix)] for m, u in zip(missing, unexpected, strict=True)
                           if m.endswith(u[len(old_prefix):])}:
            renamed = {new_prefix + k[len(old_prefix):] for k in unexpected}
            if renamed == set(missing):
                return {old_prefix: new_prefix}
    return None


def suggest_key_rules(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
    """A `checkpoint_keys` entry that would make `got` fit `expected` by renaming one leading prefix, if one does."""
    rename = suggest_rename(expected, got)
    if rename is None:
        return None
    ((old_prefix, new_prefix),) = rename.items()
    return f"checkpoint_keys: {{rename: {{'{old_prefix}': '{new_prefix}'}}}}"
