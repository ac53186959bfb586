import pytest
import torch

from spi.models import CausalLM


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    return CausalLM.load("tiny-llama")


@pytest.fixture(scope="session")
def instructions():
    return ["Give three tips for saving money.", "What is the capital of France?",
            "Write a haiku about rain.", "Explain photosynthesis briefly.",
            "How do I boil an egg?", "Name a prime number above 100.",
            "Why is the sky blue?", "Suggest a name for a cat."]


@pytest.fixture(scope="session")
def smollm2():
    return CausalLM.load("smollm2-135m-instruct")
