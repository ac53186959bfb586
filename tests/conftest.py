import os
import tempfile

# Every test is isolated from a developer's running stack: `spi up` records its home under
# $XDG_STATE_HOME/spi and commands find it there or in SPI_HOME, and MLflow / Prefect clients follow
# MLFLOW_TRACKING_URI / PREFECT_API_URL. None of the user's: a private folder, and no tracking or API URL
# unless a test (or a fixture) sets one.
_ISOLATED = tempfile.mkdtemp(prefix="spi-test-isolated-")
os.environ["XDG_STATE_HOME"] = os.path.join(_ISOLATED, "state")
os.environ["SPI_HOME"] = os.path.join(_ISOLATED, "home")
for _key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
    os.environ.pop(_key, None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# The AlpacaEval data of the development machines and CI lies beside the clone; the project itself never
# looks there (a user names the folder in SPI_ALPACA_DATA). Tests that need it skip when it is absent.
os.environ.setdefault("SPI_ALPACA_DATA", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      os.pardir, "shared", "data", "alpaca_eval"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tests time nothing; one thread keeps them steady when other jobs share the cores."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    from spi.models import CausalLM

    return CausalLM.load("tiny-llama")
