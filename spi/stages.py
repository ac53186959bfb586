"""The table of stages: what each stage's cache key depends on, declared once.

A stage's key is the digest of the code version, the stage's name, the recipe fields its entry names
(dotted paths; a section name stands for all its fields) and the inputs its entry names (digests of
upstream outputs and models, the iteration, the system, the layout of its shards). Every
caller (``spi.pipeline``, the Prefect tasks, the sharded path) computes keys with :func:`stage_key`
and nothing else, so a setting enters the key of exactly the stages that read it.

Recipe fields that enter no key are listed in UNKEYED with the reason; a test walks every leaf field
of ``Recipe`` and checks it is either named by some stage or listed there.
"""

from __future__ import annotations

from dataclasses import dataclass

from spi.config import Recipe, digest_of

CODE_VERSION = "spi-stages-2"  # bump when a stage's outputs would change for the same key (2: compute
# records reward and weak-to-strong tokens, labels their compute, value fits their cost)

_POLICY = ("seed", "policy")  # seed: every stage that samples or splits derives its randomness from it
_SEARCH = ("sampling", "search", "execution.backend")  # the backend's tokens differ: it is part of the search


@dataclass(frozen=True)
class Stage:
    name: str
    fields: tuple[str, ...]
    inputs: tuple[str, ...]
    doc: str


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("rollouts", (*_POLICY, *_SEARCH, "prompts", "iterations.prompts_per_iteration", "iterations.betas",
                      "value.first_iteration", "value.later_iterations", "value.samples_per_prompt"),
          ("iteration", "value_models", "layout"),
          "the rollouts of iteration k: draws of pi_{k-1} or the leaves of its search (spi.pipeline.rollout_plan)"),
    Stage("labels", ("reward",), ("rollouts", "layout"), "every leaf scored by the reward model"),
    Stage("value", (*_POLICY, "value"), ("iteration", "rollouts", "labels"), "V_k fitted afresh"),
    Stage("eval-set", ("seed", "evaluation.task", "evaluation.eval_set", "evaluation.n_instructions",
                       "evaluation.subset", "prompts.kinds", "prompts.max_constraints"),
          ("source",), "the evaluation instructions (source: the digest of a user's file; ifeval: with the "
                       "constraints, generated ones shaped by prompts.kinds and max_constraints)"),
    Stage("decode", (*_POLICY, *_SEARCH, "reward", "iterations.betas", "baselines.weak_to_strong_tuned",
                     "baselines.weak_to_strong_untuned", "baselines.args_weight", "baselines.args_proposal",
                     "baselines.args_candidates"),
          ("system", "eval_set", "value_models", "layout"), "one system answers the eval set"),
    Stage("best-of-first", (), ("n", "source"), "best-of-n:n read from the leaves of a wider Best-of-N decode"),
    Stage("references", ("evaluation.reference_generator",), ("eval_set", "generated"),
          "the eval set with references written by a baseline's decode"),
    Stage("judge", ("evaluation.judge", "reward"), ("system", "judge_model", "references", "outputs",
                                                     "allow_reward_judge", "layout"),
          "one system's outputs judged against the references (reward: the independence check reads it)"),
    Stage("verify", (), ("system", "eval_set", "outputs", "checker"),
          "ifeval: every constraint of one system's outputs checked (checker: the verifiers' version)"),
)}

UNKEYED = {
    "name": "names the run's folder, not what a stage computes",
    "iterations.count": "how many iterations run; each iteration's stages have keys of their own",
    "baselines.names": "which systems run, not how each decodes",
    "baselines.budget_matched_best_of_n": "whether matched Best-of-N systems run; their decodes have keys",
    "baselines.budget_matched_unit": "which matched Best-of-N sizes run; their decodes have keys",
    "tracking": "where results are recorded, not what they are",
    "execution.workdir": "where files are written",
    "execution.threads": "torch threads: the same tokens with any count",
    "execution.task_runner": "where stages run; a sharded stage's layout is its input 'layout'",
    "execution.workers": "how many workers run the shards",
    "execution.dask_address": "which cluster runs the shards",
    "execution.shard_prompts": "enters the input 'layout' of a sharded stage, not an unsharded one",
    "execution.tensor_parallel_size": "how many GPUs serve the vLLM policy: the same model and sampling",
}

WHOLE = "whole"  # the layout of an unsharded stage


def sharded_layout(shard_prompts: int) -> str:
    return f"shards-of-{shard_prompts}"


def field_value(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_key(stage: str, recipe: Recipe, **inputs) -> str:
    """The key of ``stage`` for ``recipe`` and ``inputs`` (exactly the inputs its entry names)."""
    entry = STAGES.get(stage)
    if entry is None:
        raise ValueError(f"unknown stage '{stage}' (known: {', '.join(STAGES)})")
    given, wanted = set(inputs), set(entry.inputs)
    if given != wanted:
        raise ValueError(f"stage '{stage}' is keyed by inputs {sorted(wanted)}; got {sorted(given)}")
    data = recipe.model_dump(mode="json")
    fields = {f: field_value(data, f) for f in entry.fields}
    return digest_of([CODE_VERSION, stage, fields, [inputs[name] for name in entry.inputs]])


def stages_reading(dotted: str) -> set[str]:
    """The stages whose key a recipe field enters (a section named in the table covers its fields)."""
    return {s.name for s in STAGES.values()
            if any(dotted == f or dotted.startswith(f + ".") for f in s.fields)}


def is_unkeyed(dotted: str) -> bool:
    return any(dotted == f or dotted.startswith(f + ".") for f in UNKEYED)
