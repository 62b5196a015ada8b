"""The modules' old names (the flat layout before the domain folders): `import kaggle_i2p.towers` still gives
`kaggle_i2p.models.towers`, the same module object, so users' notebooks and their monkeypatches keep working."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

# old name -> the module it is now
MOVED = {
    "errors": "core.errors", "resources": "core.resources", "fileio": "core.fileio", "_validate": "core.validate",
    "blocks": "core.blocks", "ranks": "core.ranks", "ensemble": "core.ensemble",
    "backbones": "models.backbones", "checkpoints": "models.checkpoints", "towers": "models.towers",
    "text": "models.text",
    "retrieval": "bank.folder", "search": "bank.search", "bankindex": "bank.index", "bankbuild": "bank.build",
    "textfiles": "bank.textfiles",
    "predict": "inference.predict", "images": "inference.images", "cache": "inference.cache",
    "parallel": "inference.parallel", "submission": "inference.submission", "dryrun": "inference.dryrun",
    "plan": "inference.plan",
    "evaluate": "tuning.evaluate", "tune": "tuning.tune", "folds": "tuning.folds",
    "wheelhouse": "packaging.wheelhouse",
    "trainer": "train.trainer", "export": "train.export",
}


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
        module = importlib.import_module(self.moved[spec.name])
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.specs[module.__name__]  # the import stamped the alias's spec on it: its own back


def install(package: str) -> None:
    """Serve the old names under `package` (once per process)."""
    if not any(isinstance(finder, MovedModules) and finder.package == package for finder in sys.meta_path):
        sys.meta_path.append(MovedModules(package, MOVED))
