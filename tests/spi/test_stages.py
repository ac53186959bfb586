"""The table of stages: a recipe field enters the key of exactly the stages whose entry names it."""

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from spi.config import Recipe, load_recipe
from spi.stages import STAGES, UNKEYED, is_unkeyed, stage_key, stages_reading

TINY = Path(__file__).resolve().parents[1] / "flows" / "tiny.yaml"
# fields whose type alone does not give a valid other value
SPECIAL = {"baselines.names": ["args"], "value.kind": "backbone", "value.solver": "ridge", "iterations.count": 1,
           "prompts.kinds": ["punctuation:no_comma"], "reward.constraints": ["constraints.jsonl"]}
# set beside the field so the changed recipe stays valid (the other field's own change is tested alone)
BACKBONE = {"kind": "backbone", "backbone": "tiny-llama", "solver": "adam"}
COMPANION = {"value.kind": {"backbone": "tiny-llama", "solver": "adam"}, "value.device": BACKBONE,
             "value.processes": BACKBONE, "value.init_from_reward": BACKBONE,
             "evaluation.task": {"eval_set": "generated:heldout"},
             "baselines.budget_matched_unit": {"names": ["base-greedy", "best-of-n"]}}
# fields that are valid to change only on a recipe that already has these settings (the base of the comparison)
BASE = {"execution.tensor_parallel_size": {"execution": {"backend": "vllm"}}}


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += leaf_fields(kind, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", kind))
    return out


def changed_value(dotted: str, kind, value):
    if dotted in SPECIAL:
        return SPECIAL[dotted]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Literal:
        return next(a for a in typing.get_args(kind) if a != value)
    if typing.get_origin(kind) is tuple:  # tuple[X, ...]: one more item
        return [*value, changed_value(dotted, args[0], None)]
    base = args[0] if args and typing.get_origin(kind) is not list else kind
    if base is bool:
        return not value
    if base is int:
        return 1 if value is None else value + 1
    if base is float:
        return 0.5 if not value else value * 0.5
    if base is str or typing.get_origin(base) is typing.Literal:
        if typing.get_origin(base) is typing.Literal:
            return next(a for a in typing.get_args(base) if a != value)
        return "x" if value is None else f"{value}x"
    if typing.get_origin(kind) is list:
        return [*value, value[-1] + 1.0]
    raise AssertionError(f"no changed value for {dotted} ({kind})")


def set_field(data: dict, dotted: str, value) -> dict:
    *parents, leaf = dotted.split(".")
    node = root = {}
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return root


def keys(recipe: Recipe) -> dict[str, str]:
    return {name: stage_key(name, recipe, **{i: f"input-{i}" for i in s.inputs}) for name, s in STAGES.items()}


def test_every_field_changes_exactly_the_stages_that_name_it():
    tiny = load_recipe(TINY)
    fields = leaf_fields(Recipe)
    assert len(fields) > 50
    for dotted, kind in fields:
        recipe = tiny.with_overrides(BASE[dotted]) if dotted in BASE else tiny
        data, before = recipe.model_dump(mode="json"), keys(recipe)
        node = data
        for part in dotted.split("."):
            node = node[part]
        value = changed_value(dotted, kind, node)
        override = set_field(data, dotted, value)
        if dotted in COMPANION:
            override[dotted.split(".")[0]].update(COMPANION[dotted])
        changed = recipe.with_overrides(override)
        assert changed.model_dump(mode="json") != data, dotted
        after = keys(changed)
        recomputed = {name for name in STAGES if after[name] != before[name]}
        assert recomputed == stages_reading(dotted), dotted
        # a field is either read by some stage or listed, with its reason, as reading none
        assert bool(recomputed) != is_unkeyed(dotted), dotted


def test_switching_the_backend_recomputes_rollouts_and_decodes():
    recipe = load_recipe(TINY)
    vllm = recipe.with_overrides({"execution": {"backend": "vllm"}})
    changed = {name for name in STAGES if keys(vllm)[name] != keys(recipe)[name]}
    assert changed == {"rollouts", "decode"}


def test_the_table_names_only_real_fields_and_inputs_are_checked():
    recipe = load_recipe(TINY)
    data = recipe.model_dump(mode="json")
    for name in [f for s in STAGES.values() for f in s.fields] + list(UNKEYED):
        node = data
        for part in name.split("."):
            assert part in node, name
            node = node[part]
    with pytest.raises(ValueError, match=r"keyed by inputs .*'labels'"):
        stage_key("value", recipe, iteration=1, rollouts="r")
    with pytest.raises(ValueError, match="unknown stage 'rollout'"):
        stage_key("rollout", recipe)
