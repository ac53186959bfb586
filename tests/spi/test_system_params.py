"""What each system is, as its MLflow child run shows it: the search it runs and what guides it."""

import json

import pytest

from spi.config import parse_recipe
from spi.systems import system_params

RECIPE = {
    "name": "params",
    "search": {"width": 3, "successors": 2, "chunk_length": 16},
    "sampling": {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "max_new_tokens": 64},
    "iterations": {"count": 3, "betas": [1.0, 2.0, 2.5]},
}
VALUES = [("value-aaa", "d1"), ("value-bbb", "d2"), ("value-ccc", "d3")]


@pytest.fixture(scope="module")
def recipe():
    return parse_recipe(RECIPE, source="test")


def test_spi_k_reads_its_k_value_models_with_their_betas(recipe):
    p = system_params("spi-2", recipe, VALUES)
    assert (p["search.W"], p["search.K"], p["search.L"], p["search.N"]) == ("3", "2", "16", "6")
    assert p["sampling.temperature"] == "0.6" and p["system.kind"] == "spi-k"
    assert p["values.V_1"] == "value-aaa@d1" and p["values.V_2"] == "value-bbb@d2" and "values.V_3" not in p
    assert (p["values.V_2.beta"], p["values.V_2.weight"]) == ("2.0", "0.5")
    assert json.loads(p["iterations.betas"]) == [1.0, 2.0] and p["values.count"] == "2"
    assert p["guide"] == "1*V_1 + 0.5*V_2"


def test_baselines_show_the_search_they_actually_run(recipe):
    greedy = system_params("base-greedy", recipe)
    assert (greedy["search.W"], greedy["search.K"], greedy["sampling.temperature"]) == ("1", "1", "0.0")
    assert greedy["guide"].startswith("none") and greedy["values.count"] == "0"
    bon = system_params("best-of-n:9", recipe)
    assert (bon["search.W"], bon["search.N"], bon["search.final_pick"]) == ("1", "9", "reward")
    assert bon["search.L"] == "none (one chunk)"
    assert system_params("best-of-n", recipe)["search.N"] == "6"  # the search's W*K rows
    cd = system_params("blockwise-cd", recipe, VALUES)
    assert (cd["search.W"], cd["search.K"], cd["values.V_1"], cd["guide"]) == ("1", "6", "value-aaa@d1", "1*V_1")
    assert "values.V_1.beta" not in cd  # its V_1 has weight 1, not 1/beta_1
    args = system_params("args", recipe)
    assert args["search.L"] == "1" and "reward(prefix)" in args["guide"] and "baselines.args_weight" in args


def test_a_system_missing_its_value_models_is_an_error(recipe):
    with pytest.raises(ValueError, match="spi-3.*reads 3 value models, got 2"):
        system_params("spi-3", recipe, VALUES[:2])
