"""The work-pool job templates in docs/distributed.md parse and use only declared variables."""

import re
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def templates() -> dict[str, dict]:
    blocks = re.findall(r"```yaml\n(# (\S+)\.yaml:.*?)```", DOC.read_text(), flags=re.S)
    return {name: yaml.safe_load(text) for text, name in blocks}


def test_both_gpu_templates_are_documented():
    assert set(templates()) == {"docker-gpu", "k8s-gpu"}


@pytest.mark.parametrize("name", ["docker-gpu", "k8s-gpu"])
def test_template_placeholders_are_declared_variables(name):
    template = templates()[name]
    assert set(template) == {"job_configuration", "variables"}
    declared = set(template["variables"]["properties"])
    used = set(PLACEHOLDER.findall(yaml.safe_dump(template["job_configuration"])))
    assert used - declared == set(), f"{name}: undeclared placeholders"
    assert {"command", "env", "image"} <= used


def test_gpu_requests():
    t = templates()
    requests = t["docker-gpu"]["job_configuration"]["container_create_kwargs"]["device_requests"]
    assert requests[0]["capabilities"] == [["gpu"]]
    container = t["k8s-gpu"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"


def test_execution_example_is_a_valid_execution_section():
    from spi.config import load_recipe

    block = re.search(r"```yaml\n(execution:.*?)```", DOC.read_text(), flags=re.S).group(1)
    r = load_recipe("smoke", yaml.safe_load(block))
    assert r.execution.task_runner == "dask" and r.execution.workers == 2
