"""``spi generate``: a fitted system of a finished experiment answers new prompts, resumably.

One plain run of tiny.yaml (two iterations) per module; its evaluation set is the prompts file, so
each system's answers must equal the experiment's own decode of those prompts.
"""

import json
from pathlib import Path

import pytest

from tests.flows.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """(workdir, eval-set file, {system: the experiment's outputs}) of run_plain(tiny.yaml)."""
    from flows.experiment import run_plain

    workdir = tmp_path_factory.mktemp("generate") / "work"
    run_plain(str(TINY), workdir=str(workdir))
    eval_dir = workdir / "tiny" / "eval"
    eval_set = next(p for p in eval_dir.glob("eval-set-*.json") if p.name.count(".") == 1)
    outputs = {}
    for system in ("base-greedy", "spi-1", "spi-2"):
        path = next(p for p in eval_dir.glob(f"{system}-*.json") if p.name.count(".") == 1)
        outputs[system] = [o["output"] for o in json.loads(path.read_text())["outputs"]]
    return workdir, eval_set, outputs


def generate(out, *extra, system="spi-2", workdir=None, prompts=None, recipe=TINY, plain_run=None):
    workdir = workdir or plain_run[0]
    prompts = prompts or plain_run[1]
    return run_cli("generate", "--prompts", prompts, "--system", system, "--workdir", workdir,
                   "--recipe", recipe, "--out", out, "--no-progress", *extra)


def verifier_recipe(tmp_path) -> Path:
    """tiny.yaml with the verifier reward (strict/loose IFEval verdicts instead of a classifier)."""
    import yaml

    recipe = yaml.safe_load(TINY.read_text())
    recipe["reward"] = {"kind": "verifier", "variant": "loose"}
    path = tmp_path / "tiny-verifier.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("system", ["spi-2", "base-greedy"])
def test_answers_equal_the_experiments_decode(plain_run, tmp_path, system):
    out = tmp_path / "out.jsonl"
    assert generate(out, system=system, plain_run=plain_run) == 0
    rows = read_rows(out)
    prompts = [e["instruction"] for e in json.loads(plain_run[1].read_text())]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["response"] for r in rows] == plain_run[2][system]
    assert {r["system"] for r in rows} == {system}
    assert json.loads((tmp_path / "out.jsonl.generate.json").read_text())["system"] == system


def test_registered_guided_policy_decodes_like_the_workdir(plain_run, tmp_path, new_workdir):
    """models:/NAME@candidate (the folder write_guided_policy wrote, recipe recorded in it) gives the
    workdir's spi-2 answers, under the same system digest (an OUT can be resumed from either)."""
    from mlflow_store import tracking
    from mlflow_store.registry import register_guided_policy
    from spi.config import load_recipe
    from spi.generate import workdir_plan
    from spi.systems import write_guided_policy

    workdir, eval_set, outputs = plain_run
    recipe = load_recipe(TINY)
    plan = workdir_plan(recipe, workdir, "spi-2")
    folder = write_guided_policy(tmp_path / "policy", "spi-2", recipe, list(plan.value_dirs))
    uri = tracking.default_tracking_uri(new_workdir)
    run_id = tracking.start_experiment_run(uri, "tiny", recipe.model_dump(mode="json"), recipe.digest, "test")
    register_guided_policy(uri, "tiny-value", run_id, folder)  # an MLflow Model; generate reads its folder

    out = tmp_path / "registered.jsonl"
    assert run_cli("generate", "--prompts", eval_set, "--model", "models:/tiny-value@candidate",
                   "--workdir", new_workdir, "--out", out, "--no-progress") == 0
    assert [r["response"] for r in read_rows(out)] == outputs["spi-2"]
    header = json.loads((tmp_path / "registered.jsonl.generate.json").read_text())
    assert header["digest"] == plan.digest and header["source"] == "models:/tiny-value@candidate"


def test_interrupted_run_resumes_to_the_uninterrupted_output(plain_run, tmp_path, monkeypatch):
    """The run dies after its first batch of 2 (and leaves half a line); the rerun decodes only the
    4 prompts missing, and the file equals an uninterrupted run's."""
    from spi import pipeline

    whole = tmp_path / "whole.jsonl"
    assert generate(whole, "--batch", "2", system="spi-1", plain_run=plain_run) == 0

    real, calls = pipeline.decode_rows, []

    def dies_after_first_batch(*args, **kwargs):
        calls.append(list(args[4]))
        if len(calls) > 1:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(pipeline, "decode_rows", dies_after_first_batch)
    with pytest.raises(RuntimeError, match="killed"):
        generate(out, "--batch", "2", system="spi-1", plain_run=plain_run)
    assert len(read_rows(out)) == 2
    with open(out, "a") as fh:
        fh.write('{"prompt": "half a li')  # killed mid-write

    calls.clear()
    monkeypatch.setattr(pipeline, "decode_rows", lambda *a, **k: (calls.append(list(a[4])), real(*a, **k))[1])
    assert generate(out, "--batch", "2", system="spi-1", plain_run=plain_run) == 0
    assert calls == [[2, 3], [4, 5]]
    assert out.read_text() == whole.read_text()
    assert [r["response"] for r in read_rows(out)] == plain_run[2]["spi-1"]

    calls.clear()
    assert generate(out, system="spi-1", plain_run=plain_run) == 0  # all there: nothing decoded
    assert calls == [] and out.read_text() == whole.read_text()


def test_refuses_to_mix_systems(plain_run, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert generate(out, system="base-greedy", plain_run=plain_run) == 0
    before = out.read_text()
    capsys.readouterr()
    assert generate(out, system="spi-1", plain_run=plain_run) == 2
    [line] = error_lines(capsys)
    assert "outputs of base-greedy" in line and "not of spi-1" in line
    assert out.read_text() == before

    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "x", "response": "y"}\n')
    assert generate(foreign, system="spi-1", plain_run=plain_run) == 2
    [line] = error_lines(capsys)
    assert "not written by spi generate" in line


def _bad_prompts(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "fine"}\n{"instruction": \n')
    return bad


@pytest.mark.parametrize("case, expected", [
    ("missing-file", "no such file"),
    ("bad-row", "bad.jsonl, row 2"),
    ("unknown-system", "unknown system 'spi-two'"),
    ("iteration-not-run", "iteration 3 was never run"),
    ("unfinished-workdir", "no finished iteration 1"),
    ("verifier-without-constraints", "6 prompts carry no constraints"),
])
def test_bad_input_is_one_error_line_before_any_model_loads(plain_run, tmp_path, capsys, monkeypatch, case, expected):
    from spi import models, pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded or a decode started")

    monkeypatch.setattr(models.CausalLM, "load", no_model)
    monkeypatch.setattr(pipeline, "decode_rows", no_model)
    empty = tmp_path / "empty-workdir"
    empty.mkdir()
    args = {
        "missing-file": {"prompts": tmp_path / "missing.jsonl"},
        "bad-row": {"prompts": _bad_prompts(tmp_path)},
        "unknown-system": {"system": "spi-two"},
        "iteration-not-run": {"system": "spi-3"},
        "unfinished-workdir": {"system": "spi-1", "workdir": empty},
        "verifier-without-constraints": {"system": "base-greedy", "recipe": verifier_recipe(tmp_path)},
    }[case]
    out = tmp_path / "out.jsonl"
    assert generate(out, plain_run=plain_run, **args) == 2
    [line] = error_lines(capsys)
    assert expected in line
    assert not out.exists()


def test_ifeval_prompts_keep_their_keys_and_feed_a_verifier_reward(plain_run, tmp_path):
    """IFEval-schema prompts: each line carries the prompt's key; a verifier reward (base-greedy's
    answer is scored by it) learns the prompts' constraints from the prompt set."""
    from spi import instruction_tasks

    records = instruction_tasks.generate("heldout", 3, seed=0)
    prompts = tmp_path / "ifeval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    assert generate(out, system="base-greedy", prompts=prompts, recipe=verifier_recipe(tmp_path),
                    plain_run=plain_run) == 0
    rows = read_rows(out)
    assert [(r["key"], r["prompt"]) for r in rows] == [(r["key"], r["prompt"]) for r in records]
    assert all(isinstance(r["response"], str) for r in rows)


def test_recipe_of_workdir_reads_the_summary(tmp_path):
    """Without --recipe: the built-in recipe the summary names, if the run used it unchanged."""
    from spi.config import load_recipe
    from spi.generate import GenerateError, recipe_of_workdir

    smoke = load_recipe("smoke")
    (tmp_path / "smoke").mkdir()
    summary = tmp_path / "smoke" / "summary-x.json"
    summary.write_text(json.dumps({"recipe": "smoke", "digest": smoke.digest}))
    assert recipe_of_workdir(tmp_path).digest == smoke.digest
    summary.write_text(json.dumps({"recipe": "smoke", "digest": "0" * 16}))
    with pytest.raises(GenerateError, match="other settings"):
        recipe_of_workdir(tmp_path)
    summary.write_text(json.dumps({"recipe": "tiny", "digest": "0" * 16}))
    with pytest.raises(GenerateError, match="not built in"):
        recipe_of_workdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenerateError, match="no finished experiment"):
        recipe_of_workdir(tmp_path / "empty")
