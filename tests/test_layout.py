"""The package's layout, read from its source with ``ast``: imports point one way (the table below, as in the
README), no module imports itself back through others, and every module stays under 300 lines."""

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "dpo_lightning"
PACKAGE = PACKAGE_DIR.name
MAX_LINES = 300  # every module has fewer

# layer (a subpackage, or a module at the top of the package) -> the layers its modules may import; None: any
BASE = {"losses", "atomic"}
MAY_IMPORT = {
    "losses": set(),
    "atomic": set(),
    "model": BASE | {"model"},
    "data": BASE | {"model", "data"},
    "training": BASE | {"model", "data", "training"},
    "eval": BASE | {"model", "data", "eval"},
    "pairs": BASE | {"model", "data", "eval", "pairs"},
    "cli": None,
    "__init__": None,
    "__main__": None,
}


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``dpo_lightning/training/module.py`` -> ``dpo_lightning.training.module``; a package's ``__init__.py`` is the
    package itself."""
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}


def imported_modules(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that ``source`` (module ``name``) imports, anywhere in it (function bodies too).
    Relative imports are resolved to full names; ``from X import y`` names module ``X.y`` when that is a module of
    the package, else ``X``."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                assert base, f"{name}: relative import beyond the top of the package"
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in modules:  # `import dpo_lightning.x.Name` style: the longest module prefix
                    target = target.rpartition(".")[0]
                found.add(target)
    found.discard(name)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    modules = package_modules(package_dir)
    return {name: imported_modules(path.read_text(), name, path.name == "__init__.py", set(modules))
            for name, path in modules.items()}


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of module names (first == last), or None."""
    state, stack = {}, []  # state: 1 while on the current path, 2 when done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in sorted(graph.items()):
        if layer(name) not in MAY_IMPORT:
            bad.append(f"{name}: its layer {layer(name)!r} is not in the table")
            continue
        allowed = MAY_IMPORT[layer(name)]
        if allowed is None:
            continue
        bad += [f"{name} imports {t}" for t in sorted(targets) if layer(t) not in allowed]
    return bad


GRAPH = import_graph()


def test_the_graph_sees_absolute_relative_and_function_level_imports():
    modules = set(GRAPH)
    assert len(modules) > 30 and "dpo_lightning.training.module" in modules
    # the relative imports of training/module.py, resolved
    assert {"dpo_lightning.data.collate", "dpo_lightning.losses", "dpo_lightning.model.lora",
            "dpo_lightning.training.reference"} <= GRAPH["dpo_lightning.training.module"]
    assert "dpo_lightning.cli" in GRAPH["dpo_lightning.__main__"]  # absolute
    source = ("import os\nfrom .. import losses\nfrom ..model import lora, loading\nfrom .reference import Reference\n"
              "import dpo_lightning.data.collate\n\ndef f():\n    from ..eval.probes import degeneracy\n")
    got = imported_modules(source, "dpo_lightning.training.x", False, modules)
    assert got == {"dpo_lightning.losses", "dpo_lightning.model.lora", "dpo_lightning.model.loading",
                   "dpo_lightning.training.reference", "dpo_lightning.data.collate", "dpo_lightning.eval.probes"}
    # a package's __init__ resolves `.` to itself
    assert imported_modules("from .collate import PreferenceBatch\n", "dpo_lightning.data", True, modules) == {
        "dpo_lightning.data.collate"}


def test_every_module_has_a_layer_in_the_table():
    assert {layer(name) for name in GRAPH} == set(MAY_IMPORT)


def test_imports_follow_the_layers():
    assert layer_violations(GRAPH) == []


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_a_cycle_and_an_upward_import_are_caught():
    graph = {"dpo_lightning.model.a": {"dpo_lightning.model.b"}, "dpo_lightning.model.b": {"dpo_lightning.model.c"},
             "dpo_lightning.model.c": {"dpo_lightning.model.a", "dpo_lightning.training.module"}}
    assert find_cycle(graph) == ["dpo_lightning.model.a", "dpo_lightning.model.b", "dpo_lightning.model.c",
                                 "dpo_lightning.model.a"]
    assert layer_violations(graph) == ["dpo_lightning.model.c imports dpo_lightning.training.module"]


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_every_module_is_under_300_lines(name):
    lines = len(package_modules()[name].read_text().splitlines())
    assert lines < MAX_LINES, f"{name}: {lines} lines"
