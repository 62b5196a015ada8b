"""The package's two extension tables: model libraries (timm, open_clip, ...) and tower kinds (regressor, retrieval,
prior, ...), as timm's model registry.

A table fills itself on first use from three places, in this order: the package's own modules (each registers
itself when imported), the modules or objects that installed packages name in the table's entry-point group, and
whatever a notebook cell passes to `register`. Generic code asks the table; it never names a library or a kind.

A plugin that cannot be loaded is never fatal: it is logged with its reason, and a manifest that names what it would
have registered says so in its problem line.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

log = logging.getLogger("kaggle_i2p")


class Registry:
    """Named entries of one kind (libraries or tower kinds), in registration order."""

    def __init__(self, what: str, group: str, builtins: tuple[str, ...]):
        self.what = what  # for messages: "library", "tower kind"
        self.group = group  # the entry-point group installed plugins use
        self.builtins = builtins  # the package's own modules, which register themselves on import
        self._entries: dict[str, Any] = {}
        self._failed: dict[str, str] = {}  # plugin entry point -> why it did not load
        self.replaced: dict[str, str] = {}  # name -> the module whose entry took the package's own place
        self._loaded = False
        self._loading = False

    def register(self, entry: Any, *, replace: bool = False) -> Any:
        """Add `entry` under its `name`; a name already taken is refused unless `replace` (a notebook's own fix)."""
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty `name` attribute, got {name!r}")
        self._load()  # the package's own first, whoever registers first
        taken = self._entries.get(name)
        if taken is not None and taken is not entry and not replace:
            raise ValueError(f"a {self.what} named {name!r} is already registered "
                             f"({type(taken).__module__}); pass replace=True to put yours in its place")
        if taken is not None and taken is not entry and type(taken).__module__ in self.builtins:
            self.replaced[name] = type(entry).__module__  # never silent: logged now, named in every run's summary
            log.warning("the %s %r of kaggle_i2p is replaced by %s's", self.what, name, type(entry).__module__)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests, and a notebook undoing its own registration)."""
        self._entries.pop(name, None)

    def _load(self) -> None:
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            for module in self.builtins:
                importlib.import_module(module)
            for point in entry_points(group=self.group):
                self._load_plugin(point)
            self._loaded = True
        finally:
            self._loading = False

    def _load_plugin(self, point: Any) -> None:
        """One installed plugin's entry point, loaded with its output held back: whatever it raises or prints, or a
        SystemExit (a module that parses sys.argv at import), is logged with its output and never ends the command."""
        held = io.StringIO()
        try:
            with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
                loaded = point.load()  # a module registers itself as it is imported; an object is added here
                if not isinstance(loaded, ModuleType) and self._entries.get(loaded.name) is not loaded:
                    self.register(loaded)
            if held.getvalue():  # a plugin that loaded says what it said (our own warnings among it) on stderr
                sys.stderr.write(held.getvalue())
        except (Exception, SystemExit) as err:  # noqa: BLE001 - a broken plugin is reported, never fatal
            said = " ".join(held.getvalue().split())[-300:]
            self._failed[point.name] = f"{type(err).__name__}: {err}" + (f" (it printed: {said})" if said else "")
            log.warning("%s plugin %r (%s) cannot be loaded: %s", self.what, point.name, point.value,
                        self._failed[point.name])

    def _ordered(self) -> list[tuple[str, Any]]:
        """The entries, the package's own first in their declared order (whichever was imported first), then the
        others in registration order."""
        self._load()
        rank = {module: i for i, module in enumerate(self.builtins)}
        return sorted(self._entries.items(), key=lambda item: rank.get(type(item[1]).__module__, len(rank)))

    def names(self) -> tuple[str, ...]:
        """Every registered name: the package's own first, then the plugins' in registration order."""
        return tuple(name for name, _ in self._ordered())

    def get(self, name: str) -> Any:
        """The entry named `name`; KeyError with the registered names (and any plugin that failed to load)."""
        self._load()
        if not isinstance(name, str) or name not in self._entries:
            raise KeyError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: object) -> str:
        """The problem text for a name that is not registered."""
        text = f"{name!r} is not one of {', '.join(self.names())}"
        if self._failed:
            text += " (plugins that failed to load: " + "; ".join(f"{k}: {v}" for k, v in self._failed.items()) + ")"
        return text

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[Any]:
        return iter([entry for _, entry in self._ordered()])


LIBRARIES = Registry("library", "kaggle_i2p.libraries",
                     ("kaggle_i2p.models.backbones.timm_models", "kaggle_i2p.models.backbones.open_clip_models",
                      "kaggle_i2p.models.backbones.transformers_models", "kaggle_i2p.models.backbones.programs"))
KINDS = Registry("tower kind", "kaggle_i2p.kinds",
                 ("kaggle_i2p.kinds.regressor", "kaggle_i2p.kinds.retrieval", "kaggle_i2p.kinds.prior",
                  "kaggle_i2p.kinds.caption", "kaggle_i2p.kinds.interrogator", "kaggle_i2p.kinds.features",
                  "kaggle_i2p.kinds.fusion"))


def register_library(library: Any, *, replace: bool = False) -> Any:
    """Add a model library (a `kaggle_i2p.models.backbones.BackboneLibrary`) for manifests to name."""
    return LIBRARIES.register(library, replace=replace)


def register_kind(kind: Any, *, replace: bool = False) -> Any:
    """Add a tower kind (a `kaggle_i2p.manifest.TowerKind`) for manifests to name."""
    return KINDS.register(kind, replace=replace)
