"""Validation helpers shared by the manifest and the training config: collect every problem in one pass, read YAML,
and resolve `${VAR}` / relative paths against the file that names them."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .fileio import decode_problem


class Problems:
    """Collects problems so that one validation pass reports all of them, each as `where: message`."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.unknown = 0  # unknown keys among the items: reported, but they do not stop a tower's deeper checks

    def mark(self) -> tuple[int, int]:
        """Where the problems stand now, for `blocking_since`."""
        return len(self.items), self.unknown

    def blocking_since(self, mark: tuple[int, int]) -> bool:
        """Whether a problem other than an unknown key was added since `mark` (an entry with only unknown keys
        still parses, so its architecture and checkpoint are checked in the same pass)."""
        return len(self.items) - mark[0] > self.unknown - mark[1]

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def unknown_keys(self, raw: Mapping, allowed: Collection[str], where: str = "", what: str = "key") -> None:
        """One problem per key of `raw` outside `allowed`, as `where.key: unknown key; allowed: ...` (a top-level
        key is named alone)."""
        for key in sorted(set(raw) - set(allowed), key=str):
            self.unknown += 1
            self.add(f"{where}.{key}" if where else str(key), f"unknown {what}; allowed: {', '.join(sorted(allowed))}")

    def __len__(self) -> int:
        return len(self.items)


def is_number(x: Any) -> bool:
    """A finite int or float, not a bool (YAML's `yes` must not pass as 1)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


def is_int(x: Any) -> bool:
    """A whole number, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def int_problem(value: Any, low: int = 0, high: int | None = None) -> str | None:
    """Why `value` is not a whole number in [low, high] (high None: no bound), or None."""
    if is_int(value) and value >= low and (high is None or value <= high):
        return None
    return f"{value!r} must be an integer " + (f"between {low} and {high}" if high is not None else f">= {low}")


def number_problem(value: Any, low: float = 0.0, high: float | None = None, high_open: bool = False,
                   low_open: bool = False) -> str | None:
    """Why `value` is not a number in [low, high] (a bound excluded when `low_open`/`high_open`; high None: no
    bound), or None."""
    if is_number(value) and (value > low or (value == low and not low_open)) \
            and (high is None or value < high or (value == high and not high_open)):
        return None
    bound = f" and {'<' if high_open else '<='} {high}" if high is not None else ""
    return f"{value!r} must be a number {'>' if low_open else '>='} {low}{bound}"


def pair_problem(value: Any) -> str | None:
    """Why `value` is not a [low, high] pair with 0 < low <= high, or None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(is_number(v) and v > 0 for v in value) \
            and value[0] <= value[1]:
        return None
    return f"{value!r} must be [low, high] with 0 < low <= high"


def setting_changes(stored: Mapping, given: Mapping) -> list[str]:
    """`key stored (now given)` for every setting of `given` that a folder's recorded settings hold otherwise: the
    words of a refusal to resume work made with other settings."""
    return [f"{k} {stored.get(k)!r} (now {v!r})" for k, v in given.items() if stored.get(k) != v]


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_path(raw: str, base_dir: Path) -> Path:
    """Expand `${VAR}` / `${VAR:-default}` from the environment and resolve relative paths against `base_dir`;
    an unset variable without a default raises KeyError(name)."""

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise KeyError(name)
            return default
        return value

    path = Path(_VAR.sub(substitute, raw)).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))  # `a/../b` names b once


def expanded_path(raw: str, base_dir: Path, where: str, problems: Problems, check_files: bool = True
                  ) -> Path | None:
    """`raw` expanded and resolved (`expand_path`), or None with the unset variable it names added as a problem
    (without `check_files`, the path as written: the variable may be set where the files are). Every path a config
    names goes through here, so an unset `${VAR}` is a message, never a KeyError."""
    try:
        return expand_path(raw, base_dir)
    except KeyError as err:
        if not check_files:
            return Path(raw)
        problems.add(where, f"environment variable {err.args[0]} is not set (in {raw!r}); export it, "
                            f"or write ${{{err.args[0]}:-default}}")
        return None


def resolve_file(raw: Any, base_dir: Path, where: str, problems: Problems, what: str) -> Path | None:
    """The existing file `raw` names, or None with the problem (not a string, unset variable, no such file) added."""
    if not isinstance(raw, str) or not raw.strip():
        problems.add(where, f"must be a path string to the {what}")
        return None
    path = expanded_path(raw, base_dir, where, problems)
    if path is None:
        return None
    if path.exists() and not path.is_file():
        problems.add(where, f"{path} is not a regular file (a folder, FIFO or device); give the {what} itself")
        return None
    if not path.is_file():
        origin = f"expanded from {raw!r}; " if "${" in raw else ""
        problems.add(where, f"file not found: {path} ({origin}relative paths resolve against the manifest's folder "
                            f"{base_dir}); attach the dataset that holds it or fix the path")
        return None
    return path


MAX_YAML_NODES = 200_000  # a manifest or config is hundreds of nodes; aliases may not expand it past this


def load_yaml_text(text: str) -> Any:
    """YAML text as data, safely: no Python tags (SafeLoader), and anchors/aliases allowed only while the document
    they expand to stays under MAX_YAML_NODES nodes (a "billion laughs" file of 1 KB expands to gigabytes), and never
    an alias inside the node it names. Raises yaml.YAMLError naming the problem."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(f"its anchors and aliases (&name / *name) expand to more than {MAX_YAML_NODES:,} "
                                 "values (an alias bomb); write the values out, or use fewer nested aliases")
        return loader.construct_document(node)
    except RecursionError as err:
        raise yaml.YAMLError("it nests deeper than any manifest (or an alias refers to itself)") from err
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once every alias is expanded, counted without expanding (each node's count
    memoised); stops counting past MAX_YAML_NODES. An alias inside the node it names is a YAMLError."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = _children(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        if key in open_nodes:
            raise yaml.YAMLError("an alias refers to a node that contains it (a recursive document)")
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise yaml.YAMLError("an alias refers to a node that contains it (a recursive document)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def read_yaml(path: Path, error: Callable[[Path, list[str]], Exception], missing: str, hint: str = "") -> Any:
    """A YAML file's data (`load_yaml_text`); a missing, unparsable or alias-bombed file raises
    `error(path, [problem])` naming it."""
    if not path.is_file():
        raise error(path, [f"{missing}: {path.resolve()}{hint}"])
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(path, [f"{decode_problem(err)}; save the file as UTF-8"]) from err
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as err:
        raise error(path, [f"is not valid YAML: {err}"]) from err
