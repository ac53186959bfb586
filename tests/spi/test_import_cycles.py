"""spi's modules form no import cycle: neither at import time (each module imported first in a fresh
interpreter) nor through imports inside functions, which only fail later or hide a layering knot."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def spi_modules() -> list[str]:
    return sorted(module_name(p) for p in (ROOT / "spi").rglob("*.py"))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The spi modules a file imports anywhere in it (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from spi import models
    return {name for name in found if name in known}


def import_graph(root: Path) -> dict[str, set[str]]:
    paths = {module_name(p, root): p for p in (root / "spi").rglob("*.py")}
    return {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with an explicit path)."""
    done: set[str] = set()

    def visit(node, path):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycle_among_spi_modules():
    graph = import_graph(ROOT)
    assert "spi.models" in graph and "spi.bf16_cpu" in graph["spi.models"]  # the graph sees imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_reports_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "spi").mkdir()
    (tmp_path / "spi" / "__init__.py").write_text("")
    (tmp_path / "spi" / "a.py").write_text("from spi import b\n")
    (tmp_path / "spi" / "b.py").write_text("def f():\n    from spi.a import x\n")
    (tmp_path / "spi" / "c.py").write_text("import spi.a\n")
    graph = import_graph(tmp_path)
    assert graph["spi.c"] == {"spi.a"}
    assert find_cycle(graph) == ["spi.a", "spi.b", "spi.a"]
    (tmp_path / "spi" / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(tmp_path)) is None


@pytest.mark.parametrize("module", spi_modules())
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    """Importing a module first must not run into a partly initialised one (a cycle at import time)."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
