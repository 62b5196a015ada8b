"""A manifest entry's fields, marked once on the spec dataclass and read by everything that handles entries: the
allowed keys, the writer (`entry_dict`), path rebasing (`path_keys`) and the cache's identity (`identity_dict`).

    checkpoint: Path | None = entry_field(path=True, identity=False)

Marks: `key` (the entry's key, when it is not the field's name), `path` (written relative to the manifest's folder;
"arch" for an `arch` that is a path only when its library says so), `identity` (False: it does not change the
tower's outputs, so the cache key leaves it out), `written` (False: read from elsewhere, e.g. a bank's row count),
`sparse` (written only when it differs from the default), `section` (a nested spec class with marks of its own),
`bounds` ((low, high) of a number; high None: none; `high_open`: the high bound itself excluded), from which
`checked_fields` derives a section's validation with its annotations.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

_MARKS = "kaggle_i2p"


def entry_field(default: Any = dataclasses.MISSING, *, key: str | None = None, path: bool | str = False,
                identity: bool = True, written: bool = True, sparse: bool = False, section: type | None = None,
                bounds: tuple[float, float | None] | None = None, high_open: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with its manifest marks (see the module's docstring)."""
    marks = {"key": key, "path": path, "identity": identity, "written": written, "sparse": sparse,
             "section": section, "bounds": bounds, "high_open": high_open}
    return dataclasses.field(default=default, metadata={_MARKS: marks}, **kwargs)


def marks(field: dataclasses.Field) -> dict:
    """A field's marks; an unmarked field is a written, identity-bearing key of its own name."""
    found = field.metadata.get(_MARKS) or {}
    return {"key": found.get("key") or field.name, "path": found.get("path", False),
            "identity": found.get("identity", True), "written": found.get("written", True),
            "sparse": found.get("sparse", False), "section": found.get("section"), "bounds": found.get("bounds"),
            "high_open": found.get("high_open", False)}


def written_fields(cls: type) -> list[tuple[dataclasses.Field, dict]]:
    """The fields of `cls` that are entry keys, in declaration order, with their marks."""
    return [(f, m) for f in dataclasses.fields(cls) if (m := marks(f))["written"]]


def entry_keys(cls: type) -> frozenset[str]:
    """The keys an entry of this spec class may hold (plus `kind` for a tower spec)."""
    keys = {m["key"] for _, m in written_fields(cls)}
    return frozenset(keys | ({"kind"} if hasattr(cls, "kind") else set()))


def defaults_of(cls: type) -> dict[str, Any]:
    """{key: default} of a config section's written fields (tuples as the lists YAML gives), for filling in a
    section that leaves some out."""
    out = {}
    for field, mark in written_fields(cls):
        value = _default(field)
        out[mark["key"]] = list(value) if isinstance(value, tuple) else value
    return out


def path_text(path: Path | str | tuple, out_dir: Path | None) -> str | list[str]:
    """How a resolved path (or several: a checkpoint's parts) is written into a manifest in `out_dir`: relative to it
    (absolute when not given)."""
    if isinstance(path, (tuple, list)):
        return [path_text(p, out_dir) for p in path]
    return str(path) if out_dir is None else os.path.relpath(path, out_dir)


def default_of(cls: type, name: str) -> Any:
    """A spec field's default, by field name: the one place it is written."""
    return _default(next(f for f in dataclasses.fields(cls) if f.name == name))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def entry_dict(spec: Any, out_dir: Path | None = None, arch_is_path: Any = None) -> dict:
    """The entry (or section) that parses back to `spec`: every written field, None left out, sparse fields only
    when not their default, paths relative to `out_dir`, sections by their own `to_dict`."""
    data: dict[str, Any] = {}
    for field, mark in written_fields(type(spec)):
        value = getattr(spec, field.name)
        if value is None or (mark["sparse"] and value == _default(field)):
            continue
        if mark["path"] is True or (mark["path"] == "arch" and arch_is_path is not None and arch_is_path(value)):
            value = path_text(value, out_dir)
        elif mark["section"] is not None:
            value = value.to_dict(out_dir)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        data[mark["key"]] = value
    return data


def identity_dict(cls: type, entry: dict) -> dict:
    """`entry` with what does not change a tower's outputs left out, sections too (for the cache's key)."""
    out = {}
    for _, mark in written_fields(cls):
        key = mark["key"]
        if key not in entry or not mark["identity"]:
            continue
        value = entry[key]
        out[key] = identity_dict(mark["section"], value) if mark["section"] and isinstance(value, dict) else value
    for key in entry.keys() - {m["key"] for _, m in written_fields(cls)}:
        out[key] = entry[key]  # keys the class does not mark (`kind`) stay
    return out


def path_keys(cls: type) -> list[tuple[str, bool | str, type | None]]:
    """(key, path mark, section class) of every field that is a path or holds paths, for rebasing raw entries."""
    return [(m["key"], m["path"], m["section"]) for _, m in written_fields(cls) if m["path"] or m["section"]]


def checked_fields(cls: type, raw: Any, where: str, problems: Any) -> dict[str, Any]:
    """A config section of dataclass `cls` (every field with a default), as {field: value}: each key checked as
    its annotation and marks say (bool, int, float and their `bounds`, an `X | None`, a `tuple[float, float]`
    [low, high] pair, a Literal's choices), an unknown key or a non-mapping reported; a bad value is one problem
    naming `where.key` and the default stands in for it."""
    import typing
    from collections.abc import Mapping

    from ..core.validate import int_problem, number_problem, pair_problem

    hints = typing.get_type_hints(cls)
    fields = written_fields(cls)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.add(where, f"must be a mapping with keys {', '.join(sorted(m['key'] for _, m in fields))}")
        raw = {}
    problems.unknown_keys(raw, {m["key"] for _, m in fields}, where)
    out = {}
    for field, mark in fields:
        key, default = mark["key"], field.default
        value = raw.get(key, default)
        kind, at = hints[field.name], f"{where}.{key}"
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            out[field.name] = None
            continue
        if type(None) in args:  # X | None with a value: X
            kind = next(a for a in args if a is not type(None))
        low, high = mark["bounds"] or ((0.0 if kind is float else 0), None)
        if kind is bool:
            problem = None if isinstance(value, bool) else f"{value!r} must be true or false"
        elif kind is int:
            problem = int_problem(value, low, high)
        elif kind is float:
            problem = number_problem(value, low, high, mark["high_open"])
        elif typing.get_origin(kind) is tuple:
            problem = pair_problem(value)
            value = tuple(float(v) for v in value) if problem is None else value
        elif typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            problem = None if value in choices else f"{value!r} is not one of {', '.join(map(str, choices))}"
        else:
            problem = None
        if problem is not None:
            problems.add(at, problem)
            value = default
        out[field.name] = float(value) if kind is float and value is not None else value
    return out
