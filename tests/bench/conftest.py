import pytest
import torch

from spi.models import CausalLM


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    return CausalLM.load("tiny-llama")
