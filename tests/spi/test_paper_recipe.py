"""paper.yaml follows the source (IRO) setting by setting, and names each deliberate deviation;
paper-70b.yaml is paper.yaml with the 70B policy served tensor-parallel by vLLM."""

import json
import re

import pytest
import torch

from spi.config import BUILTIN_RECIPES, RecipeError, RecipeWarning, load_recipe
from spi.pipeline import load_policy

RM = "SiliangZ/RM_Mistral_sft_init_ultrafeedbck_lr_5e6"
# the settings of IRO's code and paper (SPI.md), as recipe fields
SOURCE = {
    "policy.model": "meta-llama/Meta-Llama-3-8B-Instruct", "policy.system_message": "",
    "sampling.temperature": 0.6, "sampling.top_p": 0.9, "sampling.top_k": 50, "sampling.max_new_tokens": 2048,
    "reward.model": RM, "reward.max_length": None,
    "value.backbone": RM, "value.init_from_reward": True, "value.lora_rank": 0,
    "value.first_iteration": "best-leaf", "value.later_iterations": "search-leaves", "value.fit_on": "best",
    "value.epochs": 10, "value.learning_rate": 3e-6, "value.batch_size": 256, "value.micro_batch_size": 1,
    "value.processes": 4, "value.gradient_checkpointing": True, "value.master_dtype": "float32",
    "search.width": 4, "search.successors": 4, "search.chunk_length": 16, "search.final_pick": "reward",
    "iterations.count": 3, "iterations.betas": [1.0, 2.0, 2.5], "iterations.prompts_per_iteration": 8192,
    "prompts.train": "prompts/ultrafeedback_train.jsonl", "prompts.offset": 0,
    "baselines.weak_to_strong_tuned": "HuggingFaceH4/zephyr-7b-beta",
    "baselines.weak_to_strong_untuned": "HuggingFaceH4/mistral-7b-sft-beta",
    "baselines.args_proposal": "sampled", "baselines.args_candidates": 16, "baselines.args_weight": 1.0,
    "evaluation.eval_set": "hub", "evaluation.n_instructions": None,
    "evaluation.judge": "alpaca_eval:alpaca_eval_gpt4_turbo_fn",
}
DEVIATIONS = {"strategy", "holdout_fraction", "budget_matched_best_of_n"}


def _field(recipe, dotted):
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_paper_recipe_is_the_sources_setting_by_setting():
    paper = load_recipe("paper")
    assert {k: _field(paper, k) for k in SOURCE} == SOURCE
    assert paper.policy.device == paper.reward.device == paper.value.device == "cuda"
    assert set(paper.baselines.names) >= {"base-greedy", "best-of-n", "weak-to-strong", "args"}


def test_every_deviation_is_named_with_its_reason():
    lines = (BUILTIN_RECIPES / "paper.yaml").read_text().splitlines()
    named = {re.match(r"\s*(\w+):", line).group(1) for line in lines if "# deviation:" in line}
    assert named == DEVIATIONS
    assert all(len(line.split("# deviation:")[1].split()) >= 5 for line in lines if "# deviation:" in line)


def test_the_70b_recipe_is_the_paper_recipe_on_vllm():
    paper, big = load_recipe("paper").model_dump(), load_recipe("paper-70b").model_dump()
    assert big["policy"]["model"] == "meta-llama/Meta-Llama-3-70B-Instruct"
    assert (big["execution"]["backend"], big["execution"]["tensor_parallel_size"]) == ("vllm", 4)
    assert (big["reward"]["device"], big["value"]["device"]) == ("cuda:4", "cuda:5")
    assert "args" not in big["baselines"]["names"]  # vLLM serves no per-token proposals
    for section in ("sampling", "search", "iterations", "prompts", "evaluation"):
        assert big[section] == paper[section], section
    changed = {k for k in paper["value"] if paper["value"][k] != big["value"][k]}
    assert changed == {"device"}


def test_extends_reads_the_parent_and_refuses_cycles_and_unknown_parents(tmp_path):
    (tmp_path / "child.yaml").write_text("extends: smoke\nname: child\nsearch: {width: 3}\n")
    child, smoke = load_recipe(tmp_path / "child.yaml"), load_recipe("smoke")
    assert child.search.width == 3 and child.search.successors == smoke.search.successors
    assert child.policy == smoke.policy
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere\nname: c\n")
    with pytest.raises(RecipeError, match="extends 'nowhere'"):
        load_recipe(tmp_path / "c.yaml")


def test_a_vllm_policy_with_backbone_values_loads_no_weights(tmp_path):
    base = {"name": "shell", "policy": {"model": "tiny-llama"},
            "value": {"kind": "backbone", "backbone": "tiny-llama"}, "execution": {"backend": "vllm"}}
    (tmp_path / "r.yaml").write_text(json.dumps(base))
    recipe = load_recipe(tmp_path / "r.yaml")
    shell = load_policy(recipe)
    assert {p.device.type for p in shell.model.parameters()} == {"meta"}
    full = load_policy(recipe.with_overrides({"execution": {"backend": "transformers"}}))
    assert shell.eos_ids == full.eos_ids and shell.max_length == full.max_length
    assert shell.prompt_ids("Hi.") == full.prompt_ids("Hi.")
    head = load_policy(recipe.with_overrides({"value": {"kind": "policy-head"}}))  # a head reads its states
    assert {p.device for p in head.model.parameters()} == {torch.device("cpu")}


def test_tensor_parallelism_needs_the_vllm_backend():
    with pytest.raises(RecipeError, match="tensor_parallel_size > 1 needs execution.backend 'vllm'"):
        load_recipe("smoke", {"execution": {"tensor_parallel_size": 2}})


def test_a_reward_cut_shorter_than_the_responses_is_warned_about():
    with pytest.warns(RecipeWarning, match=r"reward.max_length \(1024\) is below sampling.max_new_tokens \(2048\)"):
        load_recipe("paper", {"reward": {"max_length": 1024}})
