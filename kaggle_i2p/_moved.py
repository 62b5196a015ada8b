"""The modules' old names that the docs showed (the flat layout before the domain folders): `import
kaggle_i2p.towers` still gives `kaggle_i2p.models.towers`, the same module object, so users' notebooks and their
monkeypatches keep working, with a FutureWarning naming the new path and the release that removes the old one.

It sits at the top of the package (the layer that may import every other), so the layering test sees what it
serves; no module below imports by a name in a string."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

REMOVED_IN = "0.3.0"  # the release that drops the old names
# old name -> the module it is now: only the names the README and docs ever showed
MOVED = {
    "errors": "core.errors", "towers": "models.towers", "text": "models.text", "predict": "inference.predict",
    "images": "inference.images", "plan": "inference.plan", "trainer": "train.trainer", "export": "train.export",
}


def warn_moved(old: str, new: str, stacklevel: int = 2) -> None:
    """The FutureWarning of an old name: where it is now and when the old one goes."""
    warnings.warn(f"kaggle_i2p.{old} is kaggle_i2p.{new} now; import it from there (the old name goes in "
                  f"kaggle_i2p {REMOVED_IN})", FutureWarning, stacklevel=stacklevel)


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder for `kaggle_i2p.<old name>`: it imports the module's new home and hands that very module on."""

    def __init__(self, package: str, moved: dict[str, str]):
        self.package = package
        self.moved = {f"{package}.{old}": f"{package}.{new}" for old, new in moved.items()}
        self.specs: dict[str, object] = {}

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 - the finder protocol
        if fullname not in self.moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:  # noqa: ANN001
        old, new = spec.name.removeprefix(f"{self.package}."), self.moved[spec.name]
        warn_moved(old, new.removeprefix(f"{self.package}."), stacklevel=4)
        module = importlib.import_module(new)
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.specs[module.__name__]  # the import stamped the alias's spec on it: its own back


def install(package: str) -> None:
    """Serve the old names under `package` (once per process)."""
    if not any(isinstance(finder, MovedModules) and finder.package == package for finder in sys.meta_path):
        sys.meta_path.append(MovedModules(package, MOVED))
