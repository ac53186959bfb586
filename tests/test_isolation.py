"""tests/conftest.py isolates every test from a developer's running stack (its recorded home, SPI_HOME,
MLFLOW_TRACKING_URI, PREFECT_API_URL)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_stack_of_the_user_is_seen():
    """The pointer folder and the stack home are private temporary folders; no tracking or API URL."""
    folder = Path(os.environ["SPI_HOME"]).parent
    assert folder.name.startswith("spi-test-isolated-") and folder.parent == Path(tempfile.gettempdir())
    assert Path(os.environ["XDG_STATE_HOME"]).parent == folder
    assert "MLFLOW_TRACKING_URI" not in os.environ and "PREFECT_API_URL" not in os.environ


def test_a_running_stacks_settings_do_not_reach_the_tests(tmp_path):
    """The test above, run as a developer with `spi up` running would run it: their variables set."""
    state = tmp_path / "state"
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "PREFECT_API_URL": "http://127.0.0.1:4200/api",
           "SPI_HOME": str(Path.home() / ".spi"), "XDG_STATE_HOME": str(state), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{Path(__file__)}::test_no_stack_of_the_user_is_seen"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
