"""The platform as a user drives it, in a real browser (slow: ~4 minutes).

`spi up` on free ports serving the project's deployments; headless Debian Chromium driven by
Playwright: open the Prefect UI, find the SPI experiment deployment, start a custom run with changed
parameters (a tiny recipe: tiny-llama / tiny-reward, and an override), watch it reach Completed, then
open the MLflow UI and find that run's parent and child runs, its parameters, and the registered
value model with its champion alias. Then the embedded default as the README has it: `spi run` on
SQLite, `mlflow server` on its database, the experiment's runs view by the link the run reports, and
Compare of two child runs listing what each system is (W, K, N, its guide and value model).
Screenshots go to a folder the test prints ($SPI_SCREENSHOTS, else a pytest temp folder).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, start_stack, stop_stack

from tests.servers import free_port, serving

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("SPI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
RECIPE_NAME = "ui-tiny"
OVERRIDES = {"seed": 7}
TINY_RECIPE = """\
name: {name}
seed: 0
policy: {{model: tiny-llama, dtype: float32}}
sampling: {{temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 8}}
reward: {{kind: hf-classifier, model: tiny-reward, batch_size: 16}}
value: {{kind: policy-head, fit_on: all, epochs: 3, learning_rate: 0.01, batch_size: 8, holdout_fraction: 0.25}}
search: {{width: 2, successors: 2, chunk_length: 4, selection: diverse, final_pick: reward, batch_prompts: 8}}
iterations: {{count: 2, betas: [1.0, 2.0], prompts_per_iteration: 4}}
prompts: {{train: "builtin:train", offset: 0}}
baselines: {{names: [base-sampled]}}
evaluation: {{eval_set: builtin, n_instructions: 6, judge: length, reference_generator: base-greedy}}
tracking: {{promotion_margin: 0.0, tracking_uri: "{mlflow}"}}
execution: {{workdir: {workdir}, threads: 1}}
"""


def _no_browser() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install chromium chromium-driver)"
    if importlib.util.find_spec("playwright") is None:
        return "Python playwright not installed (pip install playwright==1.63.0; it drives Debian's chromium)"
    return None


def _why_not() -> str | None:
    if _no_browser():
        return _no_browser()
    if importlib.util.find_spec("flows.deployments") is None:
        return "flows/deployments.py does not exist yet: there is no SPI deployment to start from the UI"
    return None


@pytest.fixture(scope="module")
def shots(tmp_path_factory, request) -> Path:
    folder = Path(os.environ.get("SPI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nscreenshots of the browser test: {folder}")
    yield folder
    if reporter is not None:
        names = ", ".join(sorted(p.name for p in folder.glob("*.png")))
        reporter.write_line(f"screenshots saved in {folder}: {names}")


def _api(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=15) as resp:
        return json.loads(resp.read())


def test_start_a_run_from_the_prefect_ui_and_find_it_in_mlflow(tmp_path, shots):
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    stack = start_stack(tmp_path / "home", deployments="flows.deployments")
    try:
        assert stack.up.returncode == 0, stack.up.stdout + stack.up.stderr
        recipe = tmp_path / "tiny.yaml"
        workdir = tmp_path / "runs"
        recipe.write_text(TINY_RECIPE.format(name=RECIPE_NAME, mlflow=stack.mlflow, workdir=workdir))
        prefect_ui = stack.api.removesuffix("/api")

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(90_000)
            try:
                flow_run_id = _start_run_in_prefect_ui(page, prefect_ui, recipe, workdir, shots)
                _watch_run_finish(page, prefect_ui, stack.api, flow_run_id, shots)
                _find_run_and_model_in_mlflow(page, stack.mlflow, shots)
            except Exception:
                page.screenshot(path=str(shots / "99-failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        stop_stack(stack)


def _start_run_in_prefect_ui(page, prefect_ui: str, recipe: Path, workdir: Path, shots: Path) -> str:
    page.goto(prefect_ui + "/deployments")
    page.get_by_text("spi-experiment", exact=True).first.wait_for()
    page.get_by_text("At 03:00 AM every day").first.wait_for()  # the nightly re-evaluation's schedule
    page.screenshot(path=str(shots / "01-prefect-deployments.png"))
    body = page.inner_text("body")
    for name in ("spi-experiment", "evaluate-champion", "fit-judge", "promote"):
        assert name in body, name

    page.get_by_text("spi-experiment", exact=True).first.click()
    page.wait_for_url("**/deployments/deployment/**")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_url("**/run?**")
    fields = page.locator("textarea")
    fields.nth(2).wait_for()
    page.wait_for_timeout(1000)  # the form fills its defaults after it appears
    assert fields.nth(0).input_value() == "smoke"  # the recipe parameter's default, as served
    fields.nth(0).fill(str(recipe))
    fields.nth(1).fill(json.dumps(OVERRIDES))
    fields.nth(2).fill(str(workdir))
    page.screenshot(path=str(shots / "02-prefect-custom-run-form.png"), full_page=True)
    run_name = page.locator("input[type=text]").first.input_value()  # the form's generated run name
    page.get_by_role("button", name="Submit").click()
    page.get_by_text(f"{run_name} scheduled to start now").first.wait_for()  # the UI's confirmation
    page.screenshot(path=str(shots / "03-prefect-run-submitted.png"))
    runs = _api(f"{prefect_ui}/api/flow_runs/filter", {"flow_runs": {"name": {"any_": [run_name]}}})
    assert len(runs) == 1, runs
    return runs[0]["id"]


def _watch_run_finish(page, prefect_ui: str, api: str, flow_run_id: str, shots: Path) -> None:
    run = _api(f"{api}/flow_runs/{flow_run_id}")
    assert run["parameters"]["recipe"].endswith("tiny.yaml")
    assert run["parameters"]["overrides"] == OVERRIDES
    deadline = time.monotonic() + 420
    while True:
        state = _api(f"{api}/flow_runs/{flow_run_id}")["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(3)
    page.goto(f"{prefect_ui}/runs/flow-run/{flow_run_id}")
    page.get_by_text(f"{RECIPE_NAME}-").first.wait_for()  # the flow renames its run after the recipe
    page.get_by_text("Completed").first.wait_for(timeout=60_000)  # the UI shows what the API says
    page.wait_for_timeout(2000)
    page.screenshot(path=str(shots / "04-prefect-flow-run-completed.png"))
    assert state == "COMPLETED", f"flow run ended {state}"


def _find_run_and_model_in_mlflow(page, mlflow: str, shots: Path) -> None:
    from mlflow_store import tracking

    client = tracking.client_for(mlflow)
    experiment = client.get_experiment_by_name(RECIPE_NAME)
    assert experiment is not None, "the run logged nothing to the MLflow server"
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`spi.role` = 'experiment'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["seed"] == str(OVERRIDES["seed"])  # the override from the UI form
    children = tracking.child_runs(mlflow, parent.info.run_id)
    assert {(c["system"], c["iteration"]) for c in children} >= {("spi", 1), ("spi", 2)}

    page.goto(mlflow + "/#/experiments")
    page.get_by_text("Model training", exact=True).click()
    page.get_by_text(RECIPE_NAME, exact=True).first.click()
    page.wait_for_url("**/runs**")
    _close_assistant(page)
    row = page.locator("[role=row]", has_text=parent.info.run_name)
    row.first.wait_for()
    row.first.locator("button").first.click()  # expand the parent: its child runs appear beneath
    for child in ("spi-iter1", "spi-iter2"):
        page.get_by_text(child, exact=True).first.wait_for()
    page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / "05-mlflow-parent-and-child-runs.png"))

    page.get_by_text(parent.info.run_name, exact=True).first.click()
    page.wait_for_url(f"**/runs/{parent.info.run_id}**")
    page.get_by_text("spi_win_rate").first.wait_for()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / "06-mlflow-parent-run.png"), full_page=True)

    model = f"{RECIPE_NAME}-value"
    aliases = dict(client.get_registered_model(model).aliases)
    assert "champion" in aliases, aliases
    page.goto(mlflow + "/#/models")
    page.get_by_text(model, exact=True).first.wait_for()
    page.get_by_text("Aliased versions").first.wait_for()  # one alias shown, the others behind "+1"
    page.wait_for_timeout(1000)
    page.keyboard.press("Escape")  # a one-time promotion dialog about the registry UI
    page.screenshot(path=str(shots / "07-mlflow-registered-models.png"))
    page.goto(f"{mlflow}/#/models/{model}")
    page.get_by_text(f"Version {aliases['champion']}").first.wait_for()
    page.wait_for_timeout(1500)
    page.keyboard.press("Escape")
    page.screenshot(path=str(shots / "08-mlflow-value-model.png"), full_page=True)
    assert "champion" in page.inner_text("body")


def _close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


# --------------------------------------------------------------------------- Compare of child runs


def _spi_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "TOKENIZERS_PARALLELISM": "false"}


def _mlflow_server(database: Path, port: int, log_path: Path):
    """`mlflow server` on an experiment's SQLite database (the README's way to look at a run), in its
    own process group, ready once /health answers; stopped when the block ends."""
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{database}", "--workers", "1"]
    return serving(argv, f"http://127.0.0.1:{port}/health", log_path, _spi_env())


def test_compare_child_runs_shows_what_each_system_is(tmp_path, shots):
    """`spi run` (embedded default: SQLite), `mlflow server` on its database; the experiment's link opens
    the runs view, and Compare of spi-1 and base-sampled lists their params side by side."""
    reason = _no_browser()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    from mlflow_store import tracking

    name, workdir = "ui-compare", tmp_path / "runs"
    database = workdir / "mlflow.db"
    recipe = tmp_path / "compare.yaml"
    recipe.write_text(TINY_RECIPE.format(name=name, mlflow=f"sqlite:///{database}", workdir=workdir))
    summary_file = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(recipe), "--workdir", str(workdir),
                          "--summary-json", str(summary_file)], env=_spi_env(), cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    parent = json.loads(summary_file.read_text())["experiment_run_id"]

    port = free_port()
    with _mlflow_server(database, port, tmp_path / "mlflow-server.log"):
        mlflow = f"http://127.0.0.1:{port}"
        children = {(c["system"], c["iteration"]): c["run_id"] for c in tracking.child_runs(mlflow, parent)}
        spi1, sampled = children[("spi", 1)], children[("base-sampled", 0)]
        client = tracking.client_for(mlflow)
        experiment_id = client.get_run(parent).info.experiment_id
        value1 = client.get_run(spi1).data.params["values.V_1"]
        assert value1.startswith("value-") and "@" in value1
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(90_000)
            try:
                page.goto(tracking.ui_url(mlflow, experiment_id))  # the runs view, not the GenAI overview
                page.wait_for_url("**/runs?**")
                page.get_by_text(client.get_run(parent).info.run_name, exact=True).first.wait_for()
                assert "workflowType=machine_learning" in page.url
                page.screenshot(path=str(shots / "10-mlflow-runs-view.png"))
                page.goto(f"{mlflow}/#/compare-runs?runs={json.dumps([spi1, sampled])}"
                          f"&experiments={json.dumps([experiment_id])}")
                page.get_by_text("search.W", exact=True).first.wait_for()
                _close_assistant(page)
                page.get_by_text("search.W", exact=True).first.scroll_into_view_if_needed()
                page.wait_for_timeout(1000)
                page.screenshot(path=str(shots / "11-mlflow-compare-child-runs.png"), full_page=True)

                def param_row(key: str) -> list[str]:  # the Parameters table's row: key, spi-1's, base-sampled's
                    row = page.locator("tr", has=page.get_by_text(key, exact=True)).first
                    return [cell.inner_text().strip() for cell in row.locator("th, td").all()]

                assert param_row("search.W") == ["search.W", "2", "1"]  # W of the search vs plain sampling
                assert param_row("search.N") == ["search.N", "4", "1"]
                assert param_row("guide") == ["guide", "1*V_1", "none (samples of the base policy)"]
                assert param_row("values.V_1")[:2] == ["values.V_1", value1]
                assert param_row("system") == ["system", "spi-1", "base-sampled"]
            except Exception:
                page.screenshot(path=str(shots / "19-compare-failure.png"), full_page=True)
                raise
            finally:
                browser.close()
