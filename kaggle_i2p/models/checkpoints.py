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


def read_state_dict(path: Path, mmap: bool = False, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a .pt/.pth/.bin file via `torch.load(weights_only=True)`, onto
    `device` (a GPU reads them straight into its memory, no host copy kept) (`mmap`: memory-mapped, nothing read until
    used, for files in torch's zip format); a sharded checkpoint's index reads all its shards."""
    shards = shard_files(path)
    if shards is not None:
        return {k: v for shard in shards for k, v in read_state_dict(shard, mmap, device).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    program = program_format(path)
    if program in ("export", "torchscript"):  # torch.load would hand a TorchScript file to torch.jit.load
        raise TowerLoadError(f"{path}: is a {program} program, not a state dict: serve it as `library: {program}` "
                             "with `arch:` naming it")
    state = load_pickled(path, device, mmap)
    # Training checkpoints often wrap the weights: {"state_dict": {...}, "epoch": 3, ...}.
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise TowerLoadError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP's leading `module.` and `torch.compile`'s `_orig_mod.` (at any depth) from checkpoint keys."""
    cleaned = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        cleaned[key] = value
    return cleaned


def read_weights(path: Path, failure: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """`read_state_dict` + `strip_prefixes`; an unreadable file becomes one TowerLoadError: "{failure} {path}: ..."."""
    try:
        return strip_prefixes(read_state_dict(path, device=device))
    except TowerLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable files become one clear error
        raise TowerLoadError(f"{failure} {path}: {err}") from err


def checkpoint_shapes(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's keys (prefixes stripped) with meta tensors of their shapes, read without loading weights:
    the safetensors header, or a memory-mapped torch file (each shard's, for a sharded checkpoint's index)."""
    shards = shard_files(path)
    if shards is not None:
        return {k: v for shard in shards for k, v in checkpoint_shapes(shard).items()}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        return strip_prefixes({k: torch.empty(shape, device="meta") for k, shape in shapes.items()})
    state = read_state_dict(path, mmap=True)
    return strip_prefixes({k: torch.empty(tuple(v.shape), device="meta") for k, v in state.items()})


def file_keys(path: Path) -> set[str] | None:
    """The keys a checkpoint file holds at its top level, nothing unwrapped or stripped (None when its top level is
    not a flat state dict: a wrapper such as Lightning's `{'state_dict': ...}`); a sharded checkpoint's, all its
    shards'."""
    shards = shard_files(path)
    if shards is not None:
        keys = [file_keys(shard) for shard in shards]
        return None if any(k is None for k in keys) else set().union(*keys)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    state = load_pickled(path, mmap=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return set(state)


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


def sha256_mismatch(path: Path, expected: str | None) -> str | None:
    """The file's sha256 when it is not `expected`, else None (also when nothing is expected)."""
    if not expected:
        return None
    actual = checkpoint_sha256(path)
    return None if actual.lower() == expected.lower() else actual


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
    open_clip's whole CLIP file, HF's whole CLIP or BLIP-2 model), the rest of such a file left out."""
    if _fits(expected, state):
        return state, None
    for candidate, note in _layouts(expected, state, classifier_prefixes, library_layouts):
        if _fits(expected, candidate):
            return candidate, note
    return state, None


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
    heads = {k.split(".", 1)[0] for k in rest if "." in k}
    missing = {k for k in expected if k.startswith("head.") and k not in out}
    if len(heads) == 1 and len(rest) == len(missing) and all("." in k for k in rest):
        (name,) = heads
        renamed = {f"head.{k[len(name) + 1:]}": k for k in rest}
        if set(renamed) == missing:
            for new, old in renamed.items():
                out[new] = out.pop(old)
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
    return sorted(counts, key=lambda p: (-counts[p], p))[:limit]


def suggest_key_rules(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str | None:
    """A `checkpoint_keys` entry that would make `got` fit `expected` by renaming one leading prefix, if one does."""
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
                return f"checkpoint_keys: {{rename: {{'{old_prefix}': '{new_prefix}'}}}}"
    return None
