"""``spi prepare-prompts``: a preference dataset's prompts, filtered by length in the policy tokenizer,
deduplicated, shuffled with a seed, written as the JSONL that prompts.train reads."""

import json

import pandas as pd
import pytest

from flows.cli import main
from spi.models import load_tokenizer
from spi.prompt_prep import prepare_prompts
from spi.prompt_sets import load_prompt_set
from spi.prompts import chat_prompt_ids

SHORT = [f"Question number {i}: what is {i} plus {i}?" for i in range(40)]
LONG = "Please summarise this: " + "a very long sentence that goes on " * 40


def _source(tmp_path, kind="jsonl"):
    rows = [{"prompt": x, "prompt_id": str(i)} for i, x in enumerate([*SHORT[:20], LONG, "  ", SHORT[3], *SHORT[20:]])]
    path = tmp_path / f"uf.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_prompts_are_filtered_deduplicated_and_shuffled_by_the_seed(tmp_path, kind):
    tokenizer = load_tokenizer("tiny-llama")
    limit = max(len(chat_prompt_ids(tokenizer, x, "")) for x in SHORT)
    assert len(chat_prompt_ids(tokenizer, LONG, "")) > limit
    done = prepare_prompts(str(_source(tmp_path, kind)), tmp_path / "out.jsonl", tokenizer, max_prompt_tokens=limit,
                           seed=1, system_message="", progress=False)
    assert (done.read, done.kept, done.too_long, done.empty, done.repeated) == (43, 40, 1, 1, 1)
    written = load_prompt_set(tmp_path / "out.jsonl").texts
    assert sorted(written) == sorted(SHORT) and written != SHORT  # every short prompt once, in a new order
    again = prepare_prompts(str(_source(tmp_path, kind)), tmp_path / "again.jsonl", tokenizer,
                            max_prompt_tokens=limit, seed=1, system_message="", progress=False)
    other = prepare_prompts(str(_source(tmp_path, kind)), tmp_path / "other.jsonl", tokenizer,
                            max_prompt_tokens=limit, seed=2, system_message="", progress=False)
    assert again.digest == done.digest and other.digest != done.digest
    assert load_prompt_set(tmp_path / "other.jsonl").texts != written


def test_the_command_writes_the_file_and_warns_when_the_recipe_needs_more(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "r", "policy": {"model": "tiny-llama", "system_message": ""},
                                  "iterations": {"count": 3, "prompts_per_iteration": 16}}))
    out = tmp_path / "prompts" / "train.jsonl"
    code = main(["prepare-prompts", "--recipe", str(recipe), "--out", str(out), "--source", str(_source(tmp_path)),
                 "--max-prompt-tokens", "64"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "wrote 40 prompts" in printed and "1 longer than 64 tokens" in printed
    assert "needs 48 prompts" in printed


@pytest.mark.parametrize("args, message", [
    (["--column", "question"], "has no column 'question' (columns: prompt, prompt_id)"),
    (["--source", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be at least 1"),
    (["--recipe", "paper"], "model 'meta-llama/Meta-Llama-3-8B-Instruct' is not in the local Hugging Face cache"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, args, message):
    base = ["prepare-prompts", "--recipe", "smoke", "--out", str(tmp_path / "o.jsonl"), "--source",
            str(_source(tmp_path))]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
