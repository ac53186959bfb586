"""policy.system_message: a system turn before every instruction, in the policy's own chat template."""

import json

from spi.config import load_recipe
from spi.models import load_tokenizer
from spi.pipeline import generate_rollouts, load_policy, rollouts_key
from spi.prompts import chat_prompt_ids

TINY = {"name": "tiny-system", "policy": {"model": "tiny-llama"}, "sampling": {"max_new_tokens": 4},
        "search": {"width": 1, "successors": 2}, "iterations": {"count": 1, "prompts_per_iteration": 2}}


def test_the_template_gets_no_empty_or_a_given_system_turn():
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    text = {m: tokenizer.decode(chat_prompt_ids(tokenizer, "Hi there.", m)) for m in (None, "", "Answer in French.")}
    assert "<|im_start|>system\n<|im_end|>" in text[""]  # IRO's empty system turn
    assert "<|im_start|>system\nAnswer in French.<|im_end|>" in text["Answer in French."]
    assert "SmolLM" in text[None]  # None keeps the template's own default
    assert all(t.rstrip().endswith("<|im_start|>assistant") for t in text.values())


def test_a_tokenizer_without_template_gets_the_message_as_a_preamble():
    class Plain:
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    assert "".join(map(chr, chat_prompt_ids(Plain(), "Q?", "Be brief."))) == "Be brief.\n\nQ?\n\nAnswer:"
    assert "".join(map(chr, chat_prompt_ids(Plain(), "Q?"))) == "Q?\n\nAnswer:"


def test_rollouts_are_decoded_from_the_prompt_with_the_system_turn(tmp_path):
    (tmp_path / "r.yaml").write_text(json.dumps({**TINY, "policy": {**TINY["policy"], "system_message": "Be brief."}}))
    recipe = load_recipe(tmp_path / "r.yaml")
    policy = load_policy(recipe)
    assert policy.system_message == "Be brief."
    out = generate_rollouts(recipe, 1, [], tmp_path / "rollouts.jsonl", progress=False)
    tokenizer = load_tokenizer("tiny-llama")
    for record in map(json.loads, out.read_text().splitlines()):
        assert record["prompt_ids"] == chat_prompt_ids(tokenizer, record["instruction"], "Be brief.")
        assert record["prompt_ids"] != chat_prompt_ids(tokenizer, record["instruction"])
    plain = recipe.with_overrides({"policy": {"system_message": None}})
    assert rollouts_key(plain, 1, []) != rollouts_key(recipe, 1, [])
    assert load_policy(plain).system_message is None and load_policy(plain).model is policy.model  # one load
