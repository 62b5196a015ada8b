"""Writing a manifest: `write_manifest` validates data as it will be read, then writes it atomically;
`save_manifest` writes a loaded Manifest; `rebase_manifest_paths` moves an entry's relative paths to another folder.
Which fields are paths comes from the kinds' field marks, never from a list of key names."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..core.fileio import atomic_open
from ..core.registry import KINDS
from .fields import path_keys
from .parse import parse_manifest
from .schema import DEFAULT_KIND, Manifest, arch_is_path


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
        elif isinstance(value, list) and path is True:  # a checkpoint's parts
            entry[key] = [_rebase(v, source_dir, out_dir) if isinstance(v, str) else v for v in value]


def write_manifest(data: Mapping, path: str | Path, *, check_files: bool = True, header: str = "") -> Manifest:
    """The one writer of manifest files: validate `data` as it will be read from `path` (relative paths resolve
    against its folder), then write it atomically; a manifest that would not load is never written."""
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
    """YAML-safe data: tuples as lists, mappings as dicts, all the way down."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


