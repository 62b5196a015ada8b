"""A manifest entry's fields, marked once on the spec dataclass and read by everything that handles entries: the
allowed keys, the writer (`entry_dict`), path rebasing (`path_keys`) and the cache's identity (`identity_dict`).

    checkpoint: Path | None = entry_field(path=True, identity=False)

Marks: `key` (the entry's key, when it is not the field's name), `path` (written relative to the manifest's folder;
"arch" for an `arch` that is a path only when its library says so), `identity` (False: it does not change the
tower's outputs, so the cache key leaves it out), `written` (False: read from elsewhere, e.g. a bank's row count),
`sparse` (written only when it differs from the default), `section` (a nested spec class with marks of its own),
`bounds` ((low, high) of a number; high None: none; `high_open`/`low_open`: that bound itself excluded), `required`
(why a field without a default must be given), `hint` (what the value means, ending a problem with its type) and
`check` (a test of its own, before the type's), `lone` (one value alone is a list of one): from these and its
annotations `checked_fields` derives a section's validation.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

_MARKS = "kaggle_i2p"


def entry_field(default: Any = dataclasses.MISSING, *, key: str | None = None, path: bool | str = False,
                identity: bool = True, written: bool = True, sparse: bool = False, section: type | None = None,
                bounds: tuple[float, float | None] | None = None, high_open: bool = False, low_open: bool = False,
                required: str = "", hint: str | Callable[[], str] = "",
                check: Callable[[Any], str | None] | None = None, lone: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with its manifest marks (see the module's docstring)."""
    marks = {"key": key, "path": path, "identity": identity, "written": written, "sparse": sparse,
             "section": section, "bounds": bounds, "high_open": high_open, "low_open": low_open,
             "required": required, "hint": hint, "check": check, "lone": lone}
    return dataclasses.field(default=default, metadata={_MARKS: marks}, **kwargs)


def marks(field: dataclasses.Field) -> dict:
    """A field's marks; an unmarked field is a written, identity-bearing key of its own name."""
    found = field.metadata.get(_MARKS) or {}
    return {"key": found.get("key") or field.name, "path": found.get("path", False),
            "identity": found.get("identity", True), "written": found.get("written", True),
            "sparse": found.get("sparse", False), "section": found.get("section"), "bounds": found.get("bounds"),
            "high_open": found.get("high_open", False), "low_open": found.get("low_open", False),
            "required": found.get("required", ""), "hint": found.get("hint", ""), "check": found.get("check"),
            "lone": found.get("lone", False), "empty_ok": _default(field) in ((), [])}


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


def checked_fields(cls: type, raw: Any, where: str, problems: Any, *, skip: Collection[str] = (),
                   only: Collection[str] | None = None, allowed: Collection[str] | None = None,
                   defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A section (or entry) of dataclass `cls` as {field: value}, each key checked as its annotation and marks say
    (`field_problems`); an unknown key (outside `allowed`, by default the class's keys) or a non-mapping reported. A
    missing key takes `defaults[key]`, else the field's default, else is "required" (with the field's `required`
    words) and left out; a bad value is one problem naming `where.key`, and its default stands in (a required field
    is left out). `skip`/`only`: the fields the caller parses itself / the only ones checked here."""
    hints = typing.get_type_hints(cls)
    keys = {m["key"] for _, m in written_fields(cls)}
    fields = [(f, m) for f, m in written_fields(cls) if f.name not in skip and (only is None or f.name in only)]
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        required = sorted(m["key"] for f, m in fields if _default(f) is dataclasses.MISSING)
        optional = sorted(m["key"] for f, m in fields if _default(f) is not dataclasses.MISSING)
        text = ", ".join(required) + (f" (and optionally {', '.join(optional)})" if required and optional else
                                      ", ".join(optional))
        problems.add(where, f"must be a mapping with {text}")
        raw = {}
    if only is None:
        problems.unknown_keys(raw, allowed if allowed is not None else keys, where)
    out = {}
    for field, mark in fields:
        key, default = mark["key"], (defaults or {}).get(mark["key"], _default(field))
        at = f"{where}.{key}" if where else key
        if key not in raw:
            if default is dataclasses.MISSING:
                problems.add(at, "is required" + (f": {mark['required']}" if mark["required"] else ""))
            else:
                out[field.name] = default
            continue
        found, value = field_problems(hints[field.name], mark, raw[key])
        for problem in found:
            problems.add(at, problem)
        if found:
            if default is not dataclasses.MISSING:
                out[field.name] = default
            continue
        out[field.name] = value
    return out


def field_problems(kind: Any, mark: dict, value: Any) -> tuple[list[str], Any]:
    """(why `value` cannot be a field of annotation `kind` with these marks, a line per bad part; the value as the
    field holds it). The field's own `check` speaks first; then bool, int and float (in `bounds`), str (not empty),
    a Literal's choices, `X | None`, a [low, high] pair, a fixed list of numbers (an RGB triplet), a list of X (one
    X alone a list of one where marked `lone`; not empty unless the default is; no repeats) and a mapping from names
    to X. The type's words end with the field's `hint`."""
    if mark["check"] is not None and (problem := mark["check"](value)) is not None:
        return [problem], value
    args = typing.get_args(kind)
    if value is None and type(None) in args:
        return [], None
    if type(None) in args:  # X | None with a value: X
        kind = next(a for a in args if a is not type(None))
    found, value = _typed(kind, mark, value)
    if found and mark["hint"]:
        hint = mark["hint"]() if callable(mark["hint"]) else mark["hint"]
        found = [f"{problem} ({hint})" for problem in found]
    return found, value


def _typed(kind: Any, mark: dict, value: Any) -> tuple[list[str], Any]:
    from ..core.validate import int_problem, is_number, number_problem, pair_problem

    origin, args = typing.get_origin(kind), typing.get_args(kind)
    low, high = mark["bounds"] or ((0.0 if kind is float else 0), None)
    problem: str | None = None
    if kind is bool:
        problem = None if isinstance(value, bool) else f"{value!r} must be true or false"
    elif kind is int:
        problem = int_problem(value, low, high)
    elif kind is float:
        problem = number_problem(value, low, high, mark["high_open"], mark["low_open"])
        value = float(value) if problem is None else value
    elif kind is str:
        problem = None if isinstance(value, str) and value else f"{value!r} must be a name"
    elif origin is typing.Literal:
        problem = None if value in args else f"{value!r} is not one of {', '.join(map(str, args))}"
    elif origin is tuple and len(args) == 2 and args[1] is not Ellipsis:  # a [low, high] pair
        problem = pair_problem(value)
        value = tuple(float(v) for v in value) if problem is None else value
    elif origin is tuple and args and args[-1] is not Ellipsis:  # a fixed list of numbers
        positive = mark["low_open"] and low == 0
        if isinstance(value, (list, tuple)) and len(value) == len(args) and all(
                is_number(v) and (v > low if mark["low_open"] else v >= low) for v in value):
            value = tuple(float(v) for v in value)
        else:
            problem = f"{value!r} must be a list of {len(args)} {'positive ' if positive else ''}numbers"
    elif origin is tuple:  # tuple[X, ...]: a list of X
        return _typed_list(args[0], mark, value)
    elif origin is dict or kind is dict:
        good = isinstance(value, Mapping) and value and all(isinstance(k, str) and k for k in value)
        if good and len(args) == 2:
            good = all(not _typed(args[1], mark, v)[0] for v in value.values())
        problem = None if good else f"{value!r} must map names to values"
        value = dict(value) if good else value
    return ([problem] if problem is not None else []), value


def _typed_list(item: Any, mark: dict, value: Any) -> tuple[list[str], Any]:
    """A list of `item` (one alone taken as a list of one where the field is marked `lone`), each checked; not empty
    unless the field's default is; a repeat is a problem."""
    items = value if isinstance(value, list) else [value] if mark["lone"] and isinstance(value, (str, int, float)) \
        and not isinstance(value, bool) else None
    if items is None or not (items or mark.get("empty_ok")):
        return [f"{value!r} must be a list, not empty"], value
    found, good = [], []
    for v in items:
        problems, v = _typed(item, mark, v)
        if not problems and v in good:
            problems = [f"{v!r} is listed twice"]
        found += problems
        good += [] if problems else [v]
    return found, tuple(good)
