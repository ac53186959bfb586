"""spi's modules form no import cycle: neither at import time (each module imported first, with no other
spi module loaded) nor through imports inside functions, which only fail later or hide a layering knot."""

import ast
import json
import subprocess
import sys
from pathlib import Path

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


# One interpreter (torch and transformers load once); before each module, every spi module is dropped from
# sys.modules, so that module is the first of spi imported, as in a fresh interpreter.
FIRST_IMPORTS = """
import importlib, json, sys, traceback
failures = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "spi" or m.startswith("spi.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def test_each_module_imports_first():
    """Importing any module first must not run into a partly initialised one (a cycle at import time)."""
    modules = spi_modules()
    assert "spi.bench.bf16" in modules and "spi.models" in modules
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORTS, *modules], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())


def test_first_import_check_sees_a_cycle_at_import_time(tmp_path):
    (tmp_path / "spi").mkdir()
    (tmp_path / "spi" / "__init__.py").write_text("")
    (tmp_path / "spi" / "a.py").write_text("from spi.b import g\n\ndef f():\n    return 1\n")
    (tmp_path / "spi" / "b.py").write_text("from spi.a import f\n\ndef g():\n    return 2\n")
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORTS, "spi.a", "spi.b"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env={"PATH": "", "PYTHONPATH": str(tmp_path)})
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(failures) == {"spi.a", "spi.b"} and "partially initialized" in failures["spi.a"]
