"""The package's two extension tables: model libraries (timm, open_clip, ...) and tower kinds (regressor, retrieval,
prior, ...), as timm's model registry.

A table holds three kinds of entries: the package's own, declared by name as "module:attribute" (as a plugin's entry
point is) and imported when first asked for (listing the names imports nothing); the modules or objects that
installed packages name in the table's entry-point group; and whatever a notebook cell passes to `register`. Generic
code asks the table; it never names a library or a kind.

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
    """Named entries of one kind (libraries or tower kinds): the package's own declared by name, imported when first
    asked for; then installed plugins and notebook registrations, in registration order."""

    def __init__(self, what: str, group: str, builtins: dict[str, str]):
        self.what = what  # for messages: "library", "tower kind"
        self.group = group  # the entry-point group installed plugins use
        self.builtins = builtins  # name -> "module:attribute" of the package's own, as a plugin declares itself
        self._own_modules = {spec.split(":")[0] for spec in builtins.values()}
        self._entries: dict[str, Any] = {}
        self._failed: dict[str, str] = {}  # plugin entry point -> why it did not load
        self.replaced: dict[str, str] = {}  # name -> the module whose entry took the package's own place
        self._plugins_loaded = False
        self._loading = False

    def _is_own(self, name: str, entry: Any) -> bool:
        return self.builtins.get(name, ":").split(":")[0] == type(entry).__module__

    def register(self, entry: Any, *, replace: bool = False) -> Any:
        """Add `entry` under its `name`; a name already taken (or one of the package's own) is refused unless
        `replace` (a notebook's own fix), which is logged and named in every run that uses it."""
        name = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty `name` attribute, got {name!r}")
        self._load_plugins()
        taken = self._entries.get(name)
        if self._is_own(name, entry):
            if taken is None:  # the package's own, imported on first use
                self._entries[name] = entry
            return entry  # (a plugin that replaced it keeps its place)
        owner = type(taken).__module__ if taken is not None else self.builtins.get(name, ":").split(":")[0]
        if (taken is not None and taken is not entry) or (taken is None and name in self.builtins):
            if not replace:
                raise ValueError(f"a {self.what} named {name!r} is already registered ({owner}); pass "
                                 "replace=True to put yours in its place")
            if name in self.builtins and (taken is None or type(taken).__module__ in self._own_modules):
                self.replaced[name] = type(entry).__module__  # never silent: logged now, named in every run
                log.warning("the %s %r of kaggle_i2p is replaced by %s's", self.what, name, type(entry).__module__)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests, and a notebook undoing its own registration); the package's own comes back when
        next asked for."""
        self._entries.pop(name, None)
        self.replaced.pop(name, None)

    def _import_own(self, name: str) -> None:
        """Import the module that declares the package's own `name` (it registers itself)."""
        if name in self.builtins and name not in self._entries:
            module, attribute = self.builtins[name].split(":")
            entry = getattr(importlib.import_module(module), attribute)
            if name not in self._entries:  # unregistered by a test after its first import: put it back
                self._entries[name] = entry

    def _load_plugins(self) -> None:
        if self._plugins_loaded or self._loading:
            return
        self._loading = True
        try:
            for point in entry_points(group=self.group):
                self._load_plugin(point)
            self._plugins_loaded = True
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

    def names(self) -> tuple[str, ...]:
        """Every name, without importing the package's own: those first in their declared order, then the plugins'
        and notebooks' in registration order."""
        self._load_plugins()
        return (*self.builtins, *(name for name in self._entries if name not in self.builtins))

    def get(self, name: str) -> Any:
        """The entry named `name` (the package's own imported now, if first asked for); KeyError with the registered
        names (and any plugin that failed to load)."""
        self._load_plugins()
        if isinstance(name, str):
            self._import_own(name)
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
        self._load_plugins()
        return isinstance(name, str) and (name in self.builtins or name in self._entries)

    def __iter__(self) -> Iterator[Any]:
        """Every entry, in `names` order (the package's own imported)."""
        return iter([self.get(name) for name in self.names()])


# The package's own, declared as a plugin declares itself (entry points' "module:attribute"); adding one is one line
# here and its module.
LIBRARIES = Registry("library", "kaggle_i2p.libraries", {
    "timm": "kaggle_i2p.models.backbones.timm_models:TIMM",
    "open_clip": "kaggle_i2p.models.backbones.open_clip_models:OPEN_CLIP",
    "transformers": "kaggle_i2p.models.backbones.transformers_models:TRANSFORMERS",
    "export": "kaggle_i2p.models.backbones.programs:EXPORT",
    "torchscript": "kaggle_i2p.models.backbones.programs:TORCHSCRIPT",
    "onnx": "kaggle_i2p.models.backbones.programs:ONNX"})
KINDS = Registry("tower kind", "kaggle_i2p.kinds", {
    "regressor": "kaggle_i2p.kinds.regressor:REGRESSOR", "retrieval": "kaggle_i2p.kinds.retrieval:RETRIEVAL",
    "prior": "kaggle_i2p.kinds.prior:PRIOR", "caption": "kaggle_i2p.kinds.caption:CAPTION",
    "interrogator": "kaggle_i2p.kinds.interrogator:INTERROGATOR", "features": "kaggle_i2p.kinds.features:FEATURES",
    "fusion": "kaggle_i2p.kinds.fusion:FUSION"})


def register_library(library: Any, *, replace: bool = False) -> Any:
    """Add a model library (a `kaggle_i2p.models.backbones.BackboneLibrary`) for manifests to name."""
    return LIBRARIES.register(library, replace=replace)


def register_kind(kind: Any, *, replace: bool = False) -> Any:
    """Add a tower kind (a `kaggle_i2p.manifest.TowerKind`) for manifests to name."""
    return KINDS.register(kind, replace=replace)
