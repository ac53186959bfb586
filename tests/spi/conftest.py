import pytest

from spi.models import CausalLM


@pytest.fixture(scope="session")
def instructions():
    return ["Give three tips for saving money.", "What is the capital of France?",
            "Write a haiku about rain.", "Explain photosynthesis briefly.",
            "How do I boil an egg?", "Name a prime number above 100.",
            "Why is the sky blue?", "Suggest a name for a cat."]


@pytest.fixture(scope="session")
def smollm2():
    return CausalLM.load("smollm2-135m-instruct")
