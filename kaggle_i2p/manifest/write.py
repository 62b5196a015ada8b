"""Writing a manifest: `write_manifest` validates data as it will be read, then writes it atomically;
`save_manifest` writes a loaded Manifest; `edit_manifest` rewrites a user's own file (inspect --append, tune --out)
keeping its comments, order and formatting; `init_manifest` starts one; `rebase_manifest_paths` moves an entry's
relative paths to another folder. Which fields are paths comes from the kinds' field marks, never from a list of key
names."""

from __future__ import annotations

import filecmp
import io
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import OutputError
from ..core.fileio import atomic_open, check_writable_file
from ..core.registry import KINDS
from ..core.resources import PRIOR_PATH
from ..core.validate import read_yaml
from .fields import path_keys
from .parse import load_fallback, parse_manifest
from .schema import DEFAULT_EMBEDDING_DIM, DEFAULT_KIND, Manifest, ManifestError, arch_is_path


def _rebase(raw: str, source_dir: Path, out_dir: Path) -> str:
    """A relative path that points at the same file from `out_dir`; absolute and `${VAR}` paths stay as they are."""
    if "${" in raw or Path(raw).is_absolute() or source_dir.resolve() == out_dir.resolve():
        return raw
    return os.path.relpath(source_dir / raw, out_dir)


def rebase_manifest_paths(data: dict, source_dir: Path, out_dir: Path) -> dict:
    """Manifest data as written (`${VAR}` paths kept) with every relative path rewritten to point at the same files
    from `out_dir`: the fallback, and each tower's fields its kind marks as paths (sections too; an `arch` when its
    library reads it as a file). An entry of an unknown kind is left as it is. Modifies and returns `data`."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if isinstance(data.get("fallback"), str):
        data["fallback"] = _rebase(data["fallback"], source_dir, out_dir)
    for tower in data.get("towers") or []:
        kind = tower.get("kind", DEFAULT_KIND) if isinstance(tower, dict) else None
        if isinstance(kind, str) and kind in KINDS:
            _rebase_entry(tower, KINDS.get(kind).spec, source_dir, out_dir)
    return data


def _rebase_entry(entry: dict, cls: type, source_dir: Path, out_dir: Path) -> None:
    """The path fields of one raw entry (or section) of spec class `cls`, rebased in place."""
    library = entry.get("library")
    for key, path, section in path_keys(cls):
        value = entry.get(key)
        if section is not None and isinstance(value, dict):
            _rebase_entry(value, section, source_dir, out_dir)
        elif isinstance(value, str) and (path is True or (path == "arch" and arch_is_path(library, value))):
            entry[key] = _rebase(value, source_dir, out_dir)
        elif isinstance(value, list) and path is True:  # a checkpoint's parts, rebased in place (comments kept)
            for position, part in enumerate(value):
                if isinstance(part, str):
                    value[position] = _rebase(part, source_dir, out_dir)


def write_manifest(data: Mapping, path: str | Path, *, check_files: bool = True, header: str = "") -> Manifest:
    """The one writer of manifest files we make: validate `data` as it will be read from `path` (relative paths
    resolve against its folder), then write it atomically; a manifest that would not load is never written. A user's
    own file is rewritten with `edit_manifest`, which keeps its comments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # a relative `../x` resolves only through an existing folder
    manifest = parse_manifest(data, path, check_files=check_files)
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(header)
        yaml.safe_dump(_plain(data), handle, sort_keys=False, default_flow_style=None)
    return manifest


def save_manifest(manifest: Manifest, path: str | Path, *, header: str = "") -> Manifest:
    """Write a loaded (or edited) Manifest to `path`, every path relative to its folder; validated, then atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(manifest.to_dict(path.resolve().parent), path, header=header)


def _plain(value: Any) -> Any:
    """YAML-safe plain data: tuples as lists, mappings as dicts, a round-trip loader's scalars as the builtin types,
    all the way down."""
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return value


def _round_trip(text: str) -> tuple[Any, Any]:
    """(data, dumper) for a YAML text read to be written back as its author wrote it: comments, key order, quoting,
    flow or block style and indentation kept (ruamel.yaml's round trip; the indentation is read off the text)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.util import load_yaml_guess_indent

    data, sequence_indent, dash_offset = load_yaml_guess_indent(text)
    dumper = YAML()
    if sequence_indent is None:  # no block list yet (`towers: []`): the towers as the package writes them
        sequence_indent, dash_offset = 4, 2
    dumper.indent(mapping=_mapping_indent(text), sequence=sequence_indent, offset=dash_offset or 0)
    dumper.width = 4096  # never re-wrap the user's long lines
    dumper.preserve_quotes = True
    return data, dumper


def _mapping_indent(text: str) -> int:
    """How far the text indents a mapping nested in a mapping (2 unless the text shows otherwise)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for line, after in zip(lines, lines[1:], strict=False):
        key = re.match(r"^(\s*)(- )?[^\s#-][^:#]*:\s*(#.*)?$", line)
        if key and not after.lstrip().startswith("- "):
            step = len(after) - len(after.lstrip()) - len(key.group(1)) - (2 if key.group(2) else 0)
            if step > 0:
                return step
    return 2


def as_written(value: Any) -> Any:
    """New data (an entry, weights) laid out as a manifest is written by hand: mappings in block style, but a
    mapping or list of plain values on one line (`head: {type: linear}`, `resolutions: [224, 336]`)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    def scalar(item: Any) -> bool:
        return not isinstance(item, (Mapping, list, tuple))

    if isinstance(value, Mapping):
        out = CommentedMap((k, as_written(v)) for k, v in value.items())
        if value and all(scalar(v) or (isinstance(v, (list, tuple)) and all(map(scalar, v))) for v in value.values()) \
                and len(repr(dict(value))) <= 80:
            out.fa.set_flow_style()
        return out
    if isinstance(value, (list, tuple)):
        out = CommentedSeq(as_written(v) for v in value)
        if all(map(scalar, value)):
            out.fa.set_flow_style()
        return out
    return value


def edit_manifest(source: str | Path, edit: Callable[[Any], None], out: str | Path | None = None, *,
                  check: Callable[[Manifest], None] | None = None, check_files: bool = True) -> Manifest:
    """Rewrite a user's manifest file: `edit` changes its data in place (the file's own round-trip mappings and
    lists), the result is validated as it will be read from `out` (default: the file itself) and by `check`, then
    written atomically with every comment, the key order and the formatting of what `edit` did not touch kept."""
    source = Path(source)
    out = Path(out) if out is not None else source
    read_yaml(source, ManifestError, "manifest file not found")  # a bounded safe read first: no alias bomb reaches
    data, dumper = _round_trip(source.read_text(encoding="utf-8"))  # the round-trip loader
    if not isinstance(data, Mapping) or not isinstance(data.get("towers"), list):
        raise ManifestError(source, ["not a manifest: a mapping with embedding_dim, fallback and a towers list"])
    edit(data)
    manifest = parse_manifest(_plain(data), out, check_files=check_files, allow_empty=True)
    if check is not None:
        check(manifest)
    text = io.StringIO()
    dumper.dump(data, text)
    with atomic_open(out, "w", encoding="utf-8") as handle:
        handle.write(text.getvalue())
    return manifest


def append_tower(data: Any, entry: Mapping) -> None:
    """Add a tower entry to a round-trip manifest's towers, on its own lines after a blank one."""
    towers = data["towers"]
    if not towers:
        towers.fa.set_block_style()  # `towers: []` as init writes it becomes a block list
    towers.append(as_written(entry))
    if len(towers) > 1:
        towers.yaml_set_comment_before_after_key(len(towers) - 1, before="\n")


INIT_TEMPLATE = """\
# A kaggle_i2p manifest: the towers a run ensembles (docs/manifest.md). Add a tower you trained with
#   kaggle-i2p inspect CHECKPOINT --append {name}
# then check it with `kaggle-i2p validate-manifest --deep {name}`, and time it with `kaggle-i2p plan --manifest {name}`.
embedding_dim: {dim}
fallback: {fallback}   # written for an image no tower can read: {what}
towers: []
"""


def init_manifest(path: str | Path, *, embedding_dim: int = DEFAULT_EMBEDDING_DIM,
                  fallback: str | Path | None = None) -> tuple[Manifest, list[Path]]:
    """Start a manifest at `path` with no towers: a new file only (an existing one is never replaced), its fallback
    the package's own mean prompt embedding copied beside it (or `fallback`, a .npy of `embedding_dim` values).
    Returns the manifest and the files written."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise OutputError(f"{path} exists; init starts a new manifest and never replaces one: give a new path, or "
                          f"add towers to it with `kaggle-i2p inspect CHECKPOINT --append {path}`")
    folder = check_writable_file(path)
    written: list[Path] = []
    if fallback is not None:
        source = Path(fallback)
        try:
            load_fallback(source, embedding_dim)
        except (ValueError, OSError) as err:
            raise ManifestError(source, [f"--fallback {err}"]) from err
        relative = os.path.relpath(source.resolve(), path.resolve().parent)
        what = "your vector"
    else:
        if embedding_dim != DEFAULT_EMBEDDING_DIM:
            raise ManifestError(path, [f"the package's fallback vector is {DEFAULT_EMBEDDING_DIM}-d (MiniLM); pass "
                                       f"--fallback FILE, a .npy of {embedding_dim} values"])
        target = path.parent / PRIOR_PATH.name
        if target.exists() and not filecmp.cmp(target, PRIOR_PATH, shallow=False):
            raise OutputError(f"{target} exists and is not the package's mean prompt embedding; it is left as it "
                              f"is: pass --fallback {target} to use it, or init in another folder")
        if not target.exists():
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_open(target, "wb") as handle, PRIOR_PATH.open("rb") as prior:
                shutil.copyfileobj(prior, handle)
            written.append(target)
        relative = target.name
        what = "the mean MiniLM embedding of generic prompts"
    text = INIT_TEMPLATE.format(name=path, dim=embedding_dim, fallback=relative, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = parse_manifest(yaml.safe_load(text), path, allow_empty=True)
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return manifest, [*written, path]


