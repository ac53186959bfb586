"""The file-based SPI stages: end to end on tiny models, resume, corrupt input, and the smoke recipe."""

import json
import statistics

import pytest

from spi.config import load_recipe
from spi.loop import run_spi
from spi.pipeline import generate_rollouts, heldout_instructions

TINY = {
    "name": "tiny", "policy": {"model": "tiny-llama"},
    "sampling": {"max_new_tokens": 8},
    "reward": {"kind": "hf-classifier", "model": "tiny-reward"},
    "value": {"epochs": 2},
    "search": {"width": 2, "successors": 2, "chunk_length": 4},
    "iterations": {"count": 2, "betas": [1.0, 2.0], "prompts_per_iteration": 4},
}


def _tiny_recipe(tmp_path, overrides=None):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(TINY))
    return load_recipe(path, overrides)


def test_tiny_experiment_writes_every_stage_and_resumes(tmp_path):
    recipe = _tiny_recipe(tmp_path)
    systems = ["base-greedy", "best-of-n", "blockwise-cd", "spi-1", "spi-2"]
    summary = run_spi(recipe, tmp_path / "run", heldout_instructions(recipe, 3), systems, progress=False)
    for k in (1, 2):
        stage = tmp_path / "run" / f"iteration-{k}"
        rollouts = [json.loads(line) for line in (stage / "rollouts.jsonl").read_text().splitlines()]
        assert len(rollouts) == 4 and all(len(r["leaves"]) == 4 for r in rollouts)
        assert (stage / "value" / "value.json").exists()
    first = (tmp_path / "run" / "iteration-1" / "rollouts.jsonl").read_text()
    assert set(summary["systems"]) == set(systems)
    assert summary["systems"]["spi-2"]["iteration"] == 2
    assert summary["systems"]["best-of-n"]["compute"]["reward_calls"] == 3 * 4
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    run_spi(recipe, tmp_path / "run", heldout_instructions(recipe, 3), systems, progress=False)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing recomputed
    assert (tmp_path / "run" / "iteration-1" / "rollouts.jsonl").read_text() == first

    changed = _tiny_recipe(tmp_path, overrides={"value": {"epochs": 3}})
    run_spi(changed, tmp_path / "run", heldout_instructions(changed, 3), ["spi-1"], progress=False)
    rollout_file = tmp_path / "run" / "iteration-1" / "rollouts.jsonl"
    value_file = tmp_path / "run" / "iteration-1" / "value" / "value.json"
    assert rollout_file.stat().st_mtime_ns == mtimes[rollout_file]  # independent of the value settings
    assert value_file.stat().st_mtime_ns != mtimes[value_file]


def test_weak_to_strong_and_args_baselines_decode(tmp_path):
    from spi.models import CausalLM
    from spi.pipeline import decode_system

    recipe = _tiny_recipe(tmp_path, {"baselines": {"args_candidates": 3}, "sampling": {"max_new_tokens": 6}})
    prompts = heldout_instructions(recipe, 2)
    pair = (CausalLM.load("tiny-llama"), CausalLM.load("tiny-llama-b"))
    w2s = json.loads(decode_system(recipe, "weak-to-strong", [], prompts, tmp_path / "w2s.json",
                                   w2s_models=pair, progress=False).read_text())
    # the pair's tokens are the weak-to-strong pair's, not a value model's
    assert w2s["compute"]["w2s_tokens"] > 0 and w2s["compute"]["value_tokens"] == 0 and w2s["boundaries"] > 0
    args = json.loads(decode_system(recipe, "args", [], prompts, tmp_path / "args.json", progress=False).read_text())
    # ARGS scores every candidate prefix with the reward model at every token
    assert args["compute"]["reward_calls"] >= 2 * 3 * 3
    assert args["compute"]["reward_tokens"] > args["compute"]["reward_calls"]  # every call reads its tokens
    assert len(args["outputs"]) == 2 and all(isinstance(o["output"], str) for o in args["outputs"])


def test_corrupt_rollout_file_is_named(tmp_path):
    recipe = _tiny_recipe(tmp_path)
    out = generate_rollouts(recipe, 1, [], tmp_path / "rollouts.jsonl", progress=False)
    out.write_text(out.read_text()[:-20] + "\n")
    from spi.pipeline import label_rollouts

    with pytest.raises(ValueError, match=r"rollouts\.jsonl:4: corrupt line"):
        label_rollouts(recipe, out, tmp_path / "labels.jsonl")


def test_smoke_recipe_guided_policy_beats_base(tmp_path):
    """SmolLM2-135M-Instruct, two SPI iterations: held-out mean reward of spi-2 above the sampled base."""
    recipe = load_recipe("smoke")
    prompts = heldout_instructions(recipe, 16)
    summary = run_spi(recipe, tmp_path, prompts, ["base-sampled", "spi-2"], progress=False)
    base = [o["reward"] for o in json.loads((tmp_path / "eval" / "base-sampled.json").read_text())["outputs"]]
    guided = [o["reward"] for o in json.loads((tmp_path / "eval" / "spi-2.json").read_text())["outputs"]]
    gains = [g - b for g, b in zip(guided, base, strict=True)]
    mean, se = statistics.mean(gains), statistics.stdev(gains) / len(gains) ** 0.5
    print(f"mean reward: base {statistics.mean(base):.3f}, spi-2 {statistics.mean(guided):.3f}, "
          f"paired gain {mean:.3f} +- {se:.3f}; value fits {summary['value_fits']}")
    assert mean > 2 * se


def test_best_of_first_n_equals_best_of_n_decoded_directly(tmp_path):
    """Best-of-4 read from the leaves of a Best-of-8 decode = best-of-n:4 decoded on its own (rows own
    their randomness), with the first 4 leaves' tokens and reward calls as its compute."""
    from spi.pipeline import best_of_first, decode_payload, decode_rows
    from spi.systems import best_of_n_rows

    recipe = _tiny_recipe(tmp_path, {"sampling": {"max_new_tokens": 12}})
    instructions = heldout_instructions(recipe, 3)
    wide = decode_payload("best-of-n:8", *decode_rows(recipe, "best-of-n:8", [], instructions, progress=False))
    narrow = decode_payload("best-of-n:4", *decode_rows(recipe, "best-of-n:4", [], instructions, progress=False))
    derived = best_of_first(wide, 4)
    assert [o["output"] for o in derived["outputs"]] == [o["output"] for o in narrow["outputs"]]
    assert derived["mean_reward"] == pytest.approx(narrow["mean_reward"], abs=1e-5)
    assert derived["compute"]["generated_tokens"] == narrow["compute"]["generated_tokens"]
    # the policy does not run a row's last sampled token: exact up to one token per dropped row
    assert abs(derived["compute"]["policy_tokens"] - narrow["compute"]["policy_tokens"]) <= 4 * 3
    assert derived["compute"]["reward_calls"] == narrow["compute"]["reward_calls"] == 12
    assert derived["compute"]["generated_tokens"] < wide["compute"]["generated_tokens"]
    with pytest.raises(ValueError, match="at least 9"):
        best_of_first(wide, 9)
    with pytest.raises(ValueError, match="positive integer"):
        best_of_n_rows("best-of-n:x", 4)


@pytest.mark.parametrize("first, later, fit_on, expected", [("policy-samples", "search-leaves", "best", (16, 4)),
                                                             ("best-leaf", "search-leaves", "all", (4, 16)),
                                                             ("best-leaf", "policy-samples", "best", (4, 16))])
def test_each_iteration_fits_on_policy_samples_or_the_searchs_leaves(tmp_path, first, later, fit_on, expected):
    """V_1 sees all W*K leaves of a prompt (policy-samples) or one (best-leaf); V_2 every draw of pi_1
    (policy-samples) or the search's leaves that value.fit_on picks (search-leaves)."""
    from spi.pipeline import fit_value_stage
    from spi.stagefiles import write_jsonl
    from spi.value import load_value_model

    recipe = _tiny_recipe(tmp_path, {"value": {"first_iteration": first, "later_iterations": later, "fit_on": fit_on,
                                               "holdout_fraction": 0.0}})
    rollouts, labels = tmp_path / "rollouts.jsonl", tmp_path / "labels.jsonl"
    write_jsonl(rollouts, [{"prompt_index": p, "instruction": f"p{p}", "prompt_ids": [5 + p, 6, 7],
                            "leaves": [{"response": "", "response_ids": [10 + j, 11 + p], "ended": j % 2 == 0}
                                       for j in range(4)]} for p in range(4)])
    write_jsonl(labels, [{"prompt_index": p, "rewards": [0.1 * j for j in range(4)], "best": 3} for p in range(4)])
    seen = [load_value_model(fit_value_stage(recipe, k, rollouts, labels, tmp_path / f"value-{k}")).report.train_sequences
            for k in (1, 2)]
    assert tuple(seen) == expected


def test_rollout_plan_draws_the_guided_policy_or_keeps_the_search(tmp_path):
    """Iteration k >= 2 under policy-samples: N searches of width 1 per prompt, each chunk and the final leaf
    drawn (not the argmax); search-leaves and iteration 1 without samples_per_prompt keep the search as it is."""
    from spi.pipeline import rollout_plan
    from spi.search import SearchSettings

    base = SearchSettings(width=2, successors=2, chunk_length=4, max_new_tokens=8)
    recipe = _tiny_recipe(tmp_path)
    assert rollout_plan(recipe, 1, base) == (base, 1)
    settings, draws = rollout_plan(recipe, 2, base)
    assert draws == 4 and (settings.width, settings.successors, settings.rows) == (1, 2, 2)
    assert settings.selection == "stochastic" and settings.selection_temperature == 1.0
    assert settings.final_pick == "value"
    assert rollout_plan(_tiny_recipe(tmp_path, {"value": {"later_iterations": "search-leaves"}}), 2, base) == (base, 1)
    sampled = _tiny_recipe(tmp_path, {"value": {"samples_per_prompt": 6}})
    settings, draws = rollout_plan(sampled, 1, base)
    assert draws == 1 and (settings.width, settings.successors) == (1, 6)  # six rows of plain sampling
    assert rollout_plan(sampled, 3, base)[1] == 6


def test_draw_leaf_is_seeded_and_proportional_to_exp_value():
    from spi.pipeline import draw_leaf

    values = [0.0, 1.0986, -30.0]  # exp: 1, 3, ~0
    assert draw_leaf(values, 7) == draw_leaf(values, 7)
    picks = [draw_leaf(values, seed) for seed in range(4000)]
    assert picks.count(2) == 0
    assert abs(picks.count(1) / len(picks) - 0.75) < 0.03


def test_later_rollouts_are_one_leaf_per_independent_draw(tmp_path):
    """spi-1's rollouts under policy-samples: W*K draws per prompt, each its own seeded search, so the draws
    differ; the same call gives the same draws; search-leaves gives the beam search's W*K leaves instead."""
    recipe = _tiny_recipe(tmp_path)
    run_spi(recipe, tmp_path / "run", heldout_instructions(recipe, 2), ["spi-1"], progress=False)
    value_dir = tmp_path / "run" / "iteration-1" / "value"
    out = generate_rollouts(recipe, 2, [value_dir], tmp_path / "draws.jsonl", progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["leaves"]) == 4 for r in rows)
    assert all(len({tuple(leaf["response_ids"]) for leaf in r["leaves"]}) > 1 for r in rows)
    again = generate_rollouts(recipe, 2, [value_dir], tmp_path / "again.jsonl", progress=False)
    assert again.read_text() == out.read_text()
    beams = _tiny_recipe(tmp_path, {"value": {"later_iterations": "search-leaves"}})
    leaves = generate_rollouts(beams, 2, [value_dir], tmp_path / "leaves.jsonl", progress=False)
    assert leaves.read_text() != out.read_text()
