"""The plugin's module graph: no import cycles, no hidden imports, Triton blocked only in the GUI."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGE = REPO / "histocluster_napari"
OURS = ("engine", "histocluster_napari")


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, imported inside a function?) of every import in ``tree``."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                if child.module == "histocluster_napari":
                    out.extend((f"histocluster_napari.{a.name}", in_function) for a in child.names)
                else:
                    out.append((child.module, in_function))
            visit(child, inner)

    visit(tree, False)
    return out


def _modules() -> dict[str, list[tuple[str, bool]]]:
    return {
        f"histocluster_napari.{p.stem}": _imports(ast.parse(p.read_text()))
        for p in sorted(PACKAGE.glob("*.py"))
        if p.stem != "__init__"
    }


def test_no_function_local_imports_of_engine_or_sibling_modules() -> None:
    hidden = [
        (module, name)
        for module, imports in _modules().items()
        for name, local in imports
        if local and name.split(".")[0] in OURS
    ]
    assert hidden == []


def test_no_import_cycles_between_plugin_modules() -> None:
    modules = _modules()
    graph = {
        m: {name for name, _ in imports if name in modules and name != m}
        for m, imports in modules.items()
    }
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append([*path[path.index(n) :], n] if n in path else [m, n])
            elif n not in state:
                walk(n, [*path, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            walk(m, [m])
    assert cycles == []


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_triton_is_blocked_by_the_widget_module_only() -> None:
    """Importing the plugin or its reader leaves Triton alone; importing the widget blocks it."""
    code = (
        "import sys, histocluster_napari, histocluster_napari._reader\n"
        "print(sys.modules.get('triton', 'absent') is None)\n"
        "import histocluster_napari._widget\n"
        "print(sys.modules.get('triton', 'absent') is None)\n"
        "import torchvision\n"  # torch imports cleanly without it
        "print(torchvision.__name__)\n"
    )
    assert _run(code).split() == ["False", "True", "torchvision"]
