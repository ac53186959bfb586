"""flows.preflight: every model a recipe names and every data file it reads, checked before the first
stage, each problem one message naming the recipe field."""

from __future__ import annotations

import json

import pytest

from flows.preflight import InputError, check_data, check_models, recipe_models
from spi.config import load_recipe
from tests.flows.conftest import TINY


def _recipe(**overrides):
    return load_recipe(str(TINY), overrides or None)


def test_every_model_field_is_checked():
    r = _recipe(value={"kind": "backbone", "backbone": "tiny-llama-b"},
                baselines={"weak_to_strong_tuned": "tiny-llama", "weak_to_strong_untuned": "tiny-llama-b"},
                evaluation={"judge": "llm:tiny-llama-b"})
    assert [field for field, _ in recipe_models(r)] == [
        "policy.model", "reward.model", "value.backbone", "baselines.weak_to_strong_tuned",
        "baselines.weak_to_strong_untuned", "evaluation.judge"]
    check_models(r)  # built-in aliases: nothing to download


@pytest.mark.parametrize("section, field", [
    ({"value": {"kind": "backbone", "backbone": "org/not-cached"}}, "value.backbone"),
    ({"evaluation": {"judge": "llm:org/not-cached"}}, "evaluation.judge"),
    ({"evaluation": {"judge": "reward:hf-classifier:org/not-cached"}}, "evaluation.judge"),
    ({"baselines": {"weak_to_strong_tuned": "org/not-cached"}}, "baselines.weak_to_strong_tuned"),
])
def test_a_model_not_here_names_its_field(section, field, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=rf"^{field}: model 'org/not-cached' .*HF_HUB_OFFLINE"):
        check_models(_recipe(**section))


def test_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(InputError, match=r"^policy\.model: model folder .* has no config\.json"):
        check_models(_recipe(policy={"model": str(tmp_path)}))
    with pytest.raises(InputError, match=r"^reward\.head: .* is not a trained head folder"):
        check_models(_recipe(reward={"kind": "preference-head", "head": str(tmp_path)}))


def test_every_data_file_parses_in_full(tmp_path):
    prompts = tmp_path / "train.jsonl"
    lines = [json.dumps({"instruction": f"Task {i}."}) for i in range(40)]
    prompts.write_text("\n".join(lines[:-1]) + '\n{"instruction": "Task 39."\n')  # the last line breaks
    with pytest.raises(InputError, match=rf"^prompts\.train: {prompts}, row 40: invalid JSON at column 27"):
        check_data(_recipe(prompts={"train": str(prompts)}))
    prompts.write_text("\n".join(lines) + "\n")
    check_data(_recipe(prompts={"train": str(prompts)}))
    with pytest.raises(InputError, match=r"^evaluation\.eval_set: .*no-such\.json"):
        check_data(_recipe(evaluation={"eval_set": str(tmp_path / "no-such.json")}))
