import pytest

from spi.config import RecipeError, load_recipe, parse_overrides
from spi.models import ModelNotFoundError, resolve


def test_builtin_recipes_load_and_digest_identifies_content():
    smoke, paper = load_recipe("smoke"), load_recipe("paper")
    assert smoke.digest != paper.digest
    assert load_recipe("smoke").digest == smoke.digest
    assert smoke.with_overrides({"search": {"width": 3}}).digest != smoke.digest
    assert (paper.search.width, paper.search.successors, paper.search.chunk_length) == (4, 4, 16)
    assert paper.iterations.betas == [1.0, 2.0, 2.5] and paper.iterations.prompts_per_iteration == 8192


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsearch: {widht: 2}\n")
    with pytest.raises(RecipeError, match=r"search\.widht"):
        load_recipe(path)


def test_invalid_value_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\niterations: {count: 3, betas: [1.0]}\n")
    with pytest.raises(RecipeError, match=r"iterations.*3 iterations"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"sampling\.top_p"):
        load_recipe("smoke", parse_overrides(["sampling.top_p=1.5"]))


def test_overrides_parse_yaml_values():
    assert parse_overrides(["search.width=2", "iterations.betas=[1, 2]"]) == {
        "search": {"width": 2}, "iterations": {"betas": [1, 2]}}
    with pytest.raises(RecipeError, match="section.field=value"):
        parse_overrides(["search.width"])


def test_unknown_recipe_lists_builtins():
    with pytest.raises(RecipeError, match="smoke"):
        load_recipe("no-such-recipe")


def test_model_names_fail_with_instructions(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="built-in alias"):
        resolve("not-a-model")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from spi.models import load_tokenizer

    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_tokenizer("some-org/some-model-that-is-not-cached")


def test_builtin_aliases_resolve_to_folders():
    assert (resolve("minilm-l6") / "config.json").exists()
    assert (resolve("tiny-llama") / "config.json").exists()


@pytest.mark.parametrize("override, named", [
    ({"evaluation": {"task": "ifeval"}}, "evaluation: Value error, evaluation.eval_set must be a prompt-set source"),
    ({"evaluation": {"task": "ifeval", "eval_set": "generated:heldout", "subset": "stratified"}},
     "evaluation.subset 'stratified'"),
    ({"evaluation": {"task": "squad"}}, "evaluation.task"),
    ({"prompts": {"kinds": ["punctuation:no_comma", "no:such_kind"]}}, "prompts.kinds"),
    ({"prompts": {"max_constraints": 0}}, "prompts.max_constraints"),
    ({"value": {"first_iteration": "best"}}, "value.first_iteration"),
])
def test_ifeval_settings_are_validated(override, named):
    with pytest.raises(RecipeError) as err:
        load_recipe("smoke", override)
    assert named in str(err.value)
    if "kinds" in override.get("prompts", {}):
        assert "no:such_kind" in str(err.value)


def test_ifeval_recipes_and_the_first_iteration_default():
    assert load_recipe("smoke").value.first_iteration == "policy-samples"
    for name, iterations in (("ifeval-smoke", 2), ("ifeval-cpu", 3)):
        r = load_recipe(name)
        assert (r.reward.kind, r.evaluation.task, r.iterations.count) == ("verifier", "ifeval", iterations)
        assert r.prompts.train == "generated:train" and r.evaluation.eval_set == "generated:heldout"
    cpu = load_recipe("ifeval-cpu")
    assert set(cpu.baselines.names) >= {"best-of-n", "blockwise-cd"} and cpu.baselines.budget_matched_best_of_n


def test_matching_best_of_n_on_forward_tokens_needs_the_best_of_n_baseline():
    cpu = load_recipe("spi/recipes/cpu.yaml")
    forward = {"budget_matched_best_of_n": True, "budget_matched_unit": "forward_tokens"}
    assert cpu.with_overrides({"baselines": forward}).baselines.budget_matched_unit == "forward_tokens"
    with pytest.raises(RecipeError, match="budget_matched_unit 'forward_tokens' needs 'best-of-n' in baselines.names"):
        cpu.with_overrides({"baselines": {**forward, "names": ["base-sampled"]}})
