"""Adding a baseline is one registration: a toy system registered here runs through the experiment's
loop and evaluation (recipe validation, decode, judge, report) with no other file touched."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from spi import systems
from spi.config import RecipeError, load_recipe
from tests.flows.conftest import TINY

SETTINGS = {
    "iterations": {"count": 1},
    "baselines": {"names": ["base-greedy", "toy-greedy-3"], "budget_matched_best_of_n": False},
    "evaluation": {"n_instructions": 3},
}


@pytest.fixture
def toy():
    """Greedy decoding cut at 3 new tokens, registered for this test only."""
    toy = systems.register(systems.System(
        "toy-greedy-3", r"toy-greedy-3",
        lambda match, recipe, base: replace(base, width=1, successors=1, temperature=0.0, max_new_tokens=3),
    ))
    yield toy
    systems.SYSTEMS.pop(toy.name)


def test_a_baseline_is_refused_until_registered():
    with pytest.raises(RecipeError, match="baselines.names.*unknown baseline 'toy-greedy-3'"):
        load_recipe(TINY, SETTINGS)


def test_a_registered_toy_baseline_runs_through_the_experiment(toy, tmp_path):
    from flows.experiment import run_plain

    out = run_plain(str(TINY), SETTINGS, str(tmp_path))
    assert set(out["systems"]) == {"base-greedy", "toy-greedy-3", "spi-1"}
    row = out["systems"]["toy-greedy-3"]
    assert row["iteration"] is None and row["training_generated_tokens"] == 0  # reads no value model
    assert out["stages"]["eval/decode-toy-greedy-3"] == "computed"
    assert out["stages"]["eval/judge-toy-greedy-3"] == "computed"
    assert "toy-greedy-3" in Path(out["report"]).read_text()

    def outputs(system):
        (path,) = [p for p in (tmp_path / "tiny" / "eval").glob(f"{system}-*.json") if p.name.count(".") == 1]
        return json.loads(path.read_text())

    toy_decode, greedy = outputs("toy-greedy-3"), outputs("base-greedy")
    assert 0 < toy_decode["compute"]["generated_tokens"] <= 3 * 3 < greedy["compute"]["generated_tokens"]
    # greedy cut at 3 tokens: each answer starts greedy's 8-token answer to the same instruction
    for short, full in zip(toy_decode["outputs"], greedy["outputs"], strict=True):
        assert short["generator"] == "toy-greedy-3" and short["instruction"] == full["instruction"]
        assert full["output"].startswith(short["output"].rstrip())
