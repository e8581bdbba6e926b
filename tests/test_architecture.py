"""The package's layering, read from its source: what imports what, and who reads Lightning's internals.

- ``diffusion/``, ``nets/`` and ``metrics/`` (the maths, the networks, the measurements) never import
  Lightning, so they are usable and testable without it;
- no import cycle between the package's modules;
- Lightning's private attributes are read in ``lightning_internals.py`` only (each read tested in
  ``tests/test_lightning_internals.py``);
- no two modules share a file name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_diff"
LIGHTNING_FREE = ("diffusion", "nets", "metrics")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Absolute module names imported at any level of the file (``from a import b`` gives ``a`` and
    ``a.b``, so importing a submodule by name counts)."""
    found = set()
    tree = ast.parse(path.read_text())
    # Imports only a type checker runs (``if TYPE_CHECKING:``) are not dependencies at run time.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("package", LIGHTNING_FREE)
def test_maths_nets_and_metrics_do_not_import_lightning(package):
    offenders = {
        name: sorted(i for i in imports(path) if i.split(".")[0] in ("lightning", "pytorch_lightning"))
        for name, path in modules().items()
        if name.startswith(f"lightning_diff.{package}")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders
    imported = {
        i
        for p in modules().values()
        if module_name(p).startswith(f"lightning_diff.{package}")
        for i in imports(p)
    }
    upward = sorted(
        i
        for i in imported
        if i.startswith(
            ("lightning_diff.models", "lightning_diff.callbacks", "lightning_diff.cli", "lightning_diff.data")
        )
    )
    assert not upward, f"lightning_diff.{package} imports from a layer above it: {upward}"


def test_no_import_cycles():
    mods = modules()
    graph = {name: sorted(i for i in imports(path) if i in mods and i != name) for name, path in mods.items()}
    # A package's __init__ re-exporting its submodules is not a cycle with them.
    graph = {
        name: [d for d in deps if not (d.startswith(name + ".") or name.startswith(d + "."))]
        for name, deps in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)


PRIVATE_READS = re.compile(r"\btrainer\._[a-z]|\._trainer\b|_connector\b|\bfit_loop\.|\._foreach_utils")


def test_lightning_internals_are_read_in_one_module():
    offenders = []
    for name, path in modules().items():
        if name == "lightning_diff.lightning_internals":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE_READS.search(code) and not code.lstrip().startswith(("'", '"')):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_long_module_says_why():
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in modules().values()
        if (n := len(path.read_text().splitlines())) > 400
        and "Over 400 lines:" not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    }
    assert not long, f"modules over 400 lines without a reason at their top: {long}"


def test_no_two_modules_share_a_name():
    """A file name says which module is meant (``kernel_score.py`` is the maths, ``kernel_wpo.py``
    the LightningModule), so no two modules of the package have the same file name."""
    by_name: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            by_name.setdefault(path.name, []).append(str(path.relative_to(PACKAGE.parent)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not shared, f"modules sharing a file name: {shared}"
