"""The package's shape: no import cycle, no import from a lower layer to a higher one, and the test fixtures
(`kaggle_i2p.testing`) never imported by production code. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kaggle_i2p"

# Lower layers first; a module may import its own layer and those below it, never one above.
LAYERS = {
    "base": {"errors", "resources", "fileio", "_validate", "blocks", "ranks"},
    "serving": {"manifest", "backbones", "checkpoints", "towers", "images", "ensemble", "search", "retrieval", "cache",
                "parallel", "predict", "submission", "dryrun", "plan", "text"},
    "upstream": {"evaluate", "tune", "folds", "wheelhouse", "textfiles", "bankindex", "bankbuild", "dataset", "train",
                 "trainer", "export"},
    "top": {"cli", "demo", "testing", "__init__", "_version"},
}
ORDER = list(LAYERS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    top = module.split(".")[0]
    return next(name for name, members in LAYERS.items() if top in members)


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative or absolute), anywhere in its code."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name.split(".") if is_package and name != "__init__" else name.split(".")[:-1]
        if name == "__init__":
            package = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                    stem = [*base, *(node.module.split(".") if node.module else [])]
                elif node.module and node.module.startswith("kaggle_i2p"):
                    stem = node.module.split(".")[1:]
                else:
                    continue
                for alias in node.names:  # `from . import x` may name a module
                    candidate = ".".join([*stem, alias.name])
                    targets.append(candidate if candidate in modules else ".".join(stem))
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("kaggle_i2p.")]
            graph[name].update(t for t in targets if t and t in modules and t != name)
    return graph


def test_every_module_has_a_layer():
    for module in _imports():
        assert _layer(module) in ORDER, module


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_import_runs_back_up_the_layers():
    upward = [f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
              for module, targets in _imports().items() for target in targets
              if ORDER.index(_layer(target)) > ORDER.index(_layer(module))]
    assert upward == []


def test_production_never_imports_the_test_fixtures():
    importers = sorted(module for module, targets in _imports().items() if "testing" in targets)
    assert importers == []
