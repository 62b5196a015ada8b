"""The package's shape: no import cycle, no import from a lower layer to a higher one, and the test fixtures
(`kaggle_i2p.testing`) never imported by production code. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kaggle_i2p"

# The layers, lowest first: a module's layer is its folder's; a module may import its own layer and those below it,
# never one above. The modules directly in kaggle_i2p/ (cli, testing, the package face) and demo/ are the top.
ORDER = ["core", "manifest", "models", "bank", "kinds", "inference", "tuning", "packaging", "dataset", "train", "top"]
MAX_TOP_MODULES = 6


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    folder = module.split(".")[0] if "." in module or (PACKAGE / module).is_dir() else "top"
    return folder if folder in ORDER else "top" if folder == "demo" else folder


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
        assert _layer(module) in ORDER, f"{module}: its folder is not one of the layers {ORDER}"


def test_few_modules_sit_directly_in_the_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


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


KIND_USERS = {"train"}  # the trainer trains regressors: it builds their spec
LIBRARY_USERS: set[str] = set()  # none: a CLIP text tower too is asked of the registry (`text_library`)


def test_generic_code_names_no_kind_and_no_library():
    """Kinds and libraries are found through the registries: only their own folders (and the few users above, each
    with its reason) import their modules."""
    libraries = {m for m in _imports() if m.startswith("models.backbones.") and m != "models.backbones.base"}
    naming = sorted(f"{module} imports {target}" for module, targets in _imports().items() for target in targets
                    if (target.startswith("kinds.") and not module.startswith("kinds.")
                        and _layer(module) not in KIND_USERS | {"top"})
                    or (target in libraries and not module.startswith("models.backbones.")
                        and module not in LIBRARY_USERS and _layer(module) != "top"))
    assert naming == []


def test_the_old_names_the_docs_showed_import_the_same_modules_with_a_warning_that_says_when_they_go():
    import importlib
    import subprocess
    import sys

    from kaggle_i2p._moved import MOVED, REMOVED_IN

    assert set(MOVED) == {"errors", "towers", "text", "predict", "images", "plan", "trainer", "export"}
    for old, new in MOVED.items():  # each in a fresh interpreter: an import warns once per process
        done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", f"import kaggle_i2p.{old}"],
                              capture_output=True, text=True)
        assert f"FutureWarning: kaggle_i2p.{old} is kaggle_i2p.{new} now; import it from there (the old name goes " \
               f"in kaggle_i2p {REMOVED_IN})" in done.stderr, done.stderr
        with pytest.warns(FutureWarning):
            sys.modules.pop(f"kaggle_i2p.{old}", None)
            assert importlib.import_module(f"kaggle_i2p.{old}") is importlib.import_module(f"kaggle_i2p.{new}"), old
    for gone in ("bankbuild", "wheelhouse", "_validate"):  # never in the docs: no shim
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"kaggle_i2p.{gone}")
    import kaggle_i2p.manifest as manifest

    assert not hasattr(manifest, "RegressorSpec")  # the kinds' names live with their kinds (no upward import)
    from kaggle_i2p.kinds.regressor import HeadSpec, RegressorSpec  # noqa: F401
    from kaggle_i2p.kinds.retrieval import RetrievalSpec  # noqa: F401


def test_no_module_below_the_top_imports_a_package_module_by_a_name_in_a_string():
    """`importlib.import_module("kaggle_i2p.kinds....")` is an import the graph above cannot see: none below the top
    layer (the registry's built-in map is its plugin table, read like entry points)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if _layer(module) == "top" or module == "core.registry":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args:
                text = ast.unparse(node.args[0])
                if "kaggle_i2p" in text or text.strip("'\"f").startswith("."):
                    found.append(f"{module}: {ast.unparse(node)}")
    assert found == []


def test_every_folder_of_the_package_is_a_package():
    """A folder without __init__.py imports from a checkout but is left out of the wheel (find_packages)."""
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").is_file()) == []
