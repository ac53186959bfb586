"""The report's cost accounting, checked against numbers worked out by hand."""

import json

import pytest

from evaluation.report import cost_fields, matched_sizes, training_iterations

N_EVAL = 10  # evaluation instructions


def _iteration(tmp_path, k: int, tokens: int, leaves_per_prompt: list[int]) -> dict:
    labels = tmp_path / f"labels-{k}.jsonl"
    labels.write_text("".join(json.dumps({"rewards": [0.5] * n}) + "\n" for n in leaves_per_prompt))
    return {"rollouts": {"compute": {"generated_tokens": tokens}}, "labels": {"path": str(labels)}}


@pytest.fixture
def iterations(tmp_path):
    # generated tokens 1000, 2000, 4000; labelled leaves 4+4+2 = 10, 5+5 = 10, 8
    return [_iteration(tmp_path, 1, 1000, [4, 4, 2]), _iteration(tmp_path, 2, 2000, [5, 5]),
            _iteration(tmp_path, 3, 4000, [8])]


def _decoded(tmp_path, name: str, reward_calls: int, boundaries: int, beam_changes: int) -> dict:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"boundaries": boundaries, "beam_changes": beam_changes}))
    return {"path": str(path), "compute": {"reward_calls": reward_calls}}


def test_spi_k_pays_for_the_first_k_iterations(tmp_path, iterations):
    row = {"system": "spi-2", "iteration": 2, "generated_tokens": 600}
    got = cost_fields(row, _decoded(tmp_path, "spi-2", 40, 12, 3), iterations, N_EVAL)
    # training: 1000 + 2000 tokens and 10 + 10 reward calls; own: 600 tokens and 40 calls
    assert got == {
        "training_tokens": 3000,
        "tokens_per_instruction": pytest.approx((600 + 3000) / 10),  # 360
        "reward_calls_per_instruction": pytest.approx((40 + 20) / 10),  # 6
        "beam_change_rate": pytest.approx(3 / 12),
    }


def test_blockwise_cd_pays_for_iteration_one_and_baselines_for_nothing(tmp_path, iterations):
    cd = cost_fields({"system": "blockwise-cd", "iteration": None, "generated_tokens": 500},
                     _decoded(tmp_path, "cd", 0, 0, 0), iterations, N_EVAL)
    assert cd["training_tokens"] == 1000
    assert cd["tokens_per_instruction"] == pytest.approx(150.0)  # (500 + 1000) / 10
    assert cd["reward_calls_per_instruction"] == pytest.approx(1.0)  # (0 + 10) / 10
    assert cd["beam_change_rate"] is None  # no chunk boundaries: no rate
    base = cost_fields({"system": "base-sampled", "iteration": None, "generated_tokens": 300},
                       _decoded(tmp_path, "base", 0, 0, 0), iterations, N_EVAL)
    assert base["training_tokens"] == 0 and base["tokens_per_instruction"] == pytest.approx(30.0)
    assert [training_iterations(s, i) for s, i in [("spi-3", 3), ("blockwise-cd", None), ("best-of-n:8", None)]] == [3, 1, 0]


def test_matched_best_of_n_generates_spi_k_tokens_per_instruction():
    rows_per_prompt = 4  # the search's W*K rows
    rows = [
        # per leaf 800 / (10 * 4) = 20 tokens; 180 tokens per instruction -> N = 9
        {"system": "spi-1", "iteration": 1, "generated_tokens": 800, "tokens_per_instruction": 180.0},
        # per leaf 600 / 40 = 15; 360 / 15 -> N = 24
        {"system": "spi-2", "iteration": 2, "generated_tokens": 600, "tokens_per_instruction": 360.0},
        # per leaf 400 / 40 = 10; 20 / 10 = 2 -> at least the W*K rows the search decodes: 4
        {"system": "spi-3", "iteration": 3, "generated_tokens": 400, "tokens_per_instruction": 20.0},
        {"system": "spi-4", "iteration": 4, "generated_tokens": 0, "tokens_per_instruction": 0.0},  # skipped
        {"system": "base-sampled", "iteration": None, "generated_tokens": 300, "tokens_per_instruction": 30.0},
    ]
    assert matched_sizes(rows, rows_per_prompt, N_EVAL) == {1: 9, 2: 24, 3: 4}
