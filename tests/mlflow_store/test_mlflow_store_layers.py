"""mlflow_store may import spi, mlflow and sqlalchemy, never a higher layer."""

import ast
from pathlib import Path

import mlflow_store

FORBIDDEN = {"prefect", "flows", "evaluation"}


def test_no_imports_of_higher_layers():
    root = Path(mlflow_store.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders
