"""Typed, validated experiment recipes.

A recipe is YAML; every section is a pydantic model that rejects unknown fields, so a typo fails
before any model loads, with the field's dotted path in the message. ``Recipe.digest`` identifies a
recipe by its content (the name excluded is not: two recipes differing only in name differ).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_RECIPES = Path(__file__).parent / "recipes"


class RecipeWarning(UserWarning):
    """A valid recipe with a setting that is probably not what its author meant."""


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingConfig(Section):
    temperature: float = Field(0.6, gt=0, description="softmax temperature of the policy")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus mass kept")
    top_k: int = Field(50, ge=0, description="0 disables top-k")
    max_new_tokens: int = Field(128, ge=1, description="response length cap in tokens")


DTYPE = Literal["float32", "bfloat16", "float16"]


class PolicyConfig(Section):
    model: str = Field("smollm2-135m-instruct", description="built-in alias, local folder or hub id")
    dtype: DTYPE = "float32"
    device: str = Field("cpu", description="torch device of the policy, e.g. cpu, cuda, cuda:1")
    system_message: str | None = Field(
        None, description="a system turn before each instruction; null = none ('' = an empty system turn, as "
                          "IRO's Llama-3 prompts)")


class RewardConfig(Section):
    kind: Literal["llm-judge", "hf-classifier", "preference-head", "verifier"] = "llm-judge"
    model: str = "smollm2-135m-instruct"
    head: str | None = Field(None, description="preference-head: folder of a trained head")
    batch_size: int = Field(8, ge=1)
    variant: Literal["strict", "loose"] = Field("strict", description="verifier: IFEval's strict or loose verdicts")
    constraints: tuple[str, ...] = Field(
        (), description="verifier: JSONL files in IFEval's schema whose prompts' constraints are checked "
                        "(prompt records can also be registered in code)")
    dtype: DTYPE = "float32"
    device: str | None = Field(None, description="torch device of the reward model; null = the policy's")
    max_length: int | None = Field(
        None, ge=1, description="tokens read per (prompt, response); null = the model config's max_position_embeddings"
    )


class ValueConfig(Section):
    kind: Literal["policy-head", "backbone"] = Field(
        "policy-head", description="scalar head on the frozen policy's hidden states, or a separate backbone"
    )
    backbone: str | None = Field(None, description="backbone kind: model name; same tokenizer as the policy")
    lora_rank: int = Field(0, ge=0, description="backbone kind: 0 = full fine-tune, >0 = LoRA rank")
    fit_on: Literal["best", "all"] = Field(
        "best", description="value.later_iterations search-leaves: the leaves V_k (k >= 2) is fitted on, "
                            "argmax-r per prompt (IRO) or all")
    first_iteration: Literal["policy-samples", "best-leaf"] = Field(
        "policy-samples", description="V_1's leaves: all W*K samples of pi_0 (V_1 is the value of pi_0, as the "
                                      "theory states) or the argmax-r leaf per prompt (the source code's choice)")
    later_iterations: Literal["policy-samples", "search-leaves"] = Field(
        "policy-samples", description="V_k's rollouts (k >= 2): independent draws of the guided policy pi_{k-1} "
                                      "(chunks drawn in proportion to pi_0 * exp(sum V_i / beta_i); V_k is the value "
                                      "of pi_{k-1}) or the W*K leaves of pi_{k-1}'s beam search (the source code's "
                                      "choice; value.fit_on then picks among them)")
    samples_per_prompt: int | None = Field(
        None, ge=1, description="policy-samples: draws of pi_{k-1} per training prompt; null = W*K")
    epochs: int = Field(10, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    holdout_fraction: float = Field(0.2, ge=0, lt=1, description="prompts held out to measure the fit")
    pooling: Literal["last", "last+mean"] = Field(
        "last", description="policy-head: the head reads the state at t, or beside it the mean state of the response so far"
    )
    solver: Literal["adam", "ridge"] = Field(
        "adam", description="adam: epochs of AdamW; ridge: exact head, L2 penalty cross-validated over prompts (policy-head)"
    )
    device: str | None = Field(None, description="backbone kind: torch device of the backbone; null = the policy's")
    dtype: DTYPE | None = Field(None, description="backbone kind: dtype of the backbone at search time; null = the policy's")
    max_length: int | None = Field(
        None, ge=1, description="value-input tokens read in fitting; null = the feature model config's max_position_embeddings"
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="examples per forward/backward; batch_size = micro x accumulation x processes; null = no accumulation"
    )
    gradient_checkpointing: bool = Field(False, description="backbone kind: recompute activations in backward")
    master_dtype: Literal["float32", "model"] = Field(
        "float32", description="backbone kind: float32 master weights under autocast, or train in the loaded dtype"
    )
    processes: int = Field(1, ge=1, description="backbone kind: data-parallel processes (accelerate), one per device")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="processes > 1: replicate (DDP) or shard (FSDP)")
    init_from_reward: bool = Field(
        False, description="backbone kind: start V_k from the reward model named by value.backbone (IRO)"
    )

    @model_validator(mode="after")
    def _backbone_named(self):
        if self.kind == "backbone" and not self.backbone:
            raise ValueError("value.backbone must name a model when value.kind is 'backbone'")
        if self.pooling != "last" and self.kind != "policy-head":
            raise ValueError(f"value.pooling '{self.pooling}' needs value.kind 'policy-head'")
        if self.solver == "ridge" and self.kind != "policy-head":
            raise ValueError("value.solver 'ridge' needs value.kind 'policy-head'")
        if self.device is not None and self.kind != "backbone":
            raise ValueError("value.device applies to the backbone kind: a policy head sits on the policy's device")
        if (self.processes > 1 or self.init_from_reward) and self.kind != "backbone":
            raise ValueError("value.processes > 1 and value.init_from_reward need value.kind 'backbone'")
        micro = self.micro_batch_size or self.batch_size // self.processes
        if self.batch_size % (micro * self.processes):
            raise ValueError(f"value.batch_size ({self.batch_size}) must be a multiple of value.micro_batch_size "
                             f"({micro}) x value.processes ({self.processes})")
        return self


class SearchConfig(Section):
    width: int = Field(4, ge=1, description="W: beams kept after each chunk")
    successors: int = Field(4, ge=1, description="K: continuations sampled per beam")
    chunk_length: int | None = Field(16, ge=1, description="L: tokens per chunk; null = whole response (Best-of-N)")
    selection: Literal["diverse", "stochastic"] = "diverse"
    selection_temperature: float = Field(1.0, gt=0, description="tau of the stochastic selection")
    final_pick: Literal["reward", "value"] = "reward"
    batch_prompts: int = Field(8, ge=1, description="prompts decoded together in one batch")


class IterationsConfig(Section):
    count: int = Field(3, ge=0)
    betas: list[float] = Field(default_factory=lambda: [1.0, 2.0, 2.5])
    prompts_per_iteration: int = Field(64, ge=1)

    @field_validator("betas")
    @classmethod
    def _positive(cls, betas):
        if any(b <= 0 for b in betas):
            raise ValueError("every beta must be > 0")
        return betas

    @model_validator(mode="after")
    def _enough_betas(self):
        if len(self.betas) < self.count:
            raise ValueError(f"iterations.betas has {len(self.betas)} values for {self.count} iterations")
        return self


class PromptsConfig(Section):
    train: str = Field("builtin:train", description="any spi.prompt_sets source: 'builtin:train', "
                                                    "'generated:train', a JSON/JSONL file, a hub id")
    offset: int = Field(0, ge=0, description="first training prompt used")
    kinds: list[str] | None = Field(None, description="generated sources (training and evaluation): constraint "
                                                      "kinds drawn (spi.instruction_tasks); null = the default kinds")
    max_constraints: int = Field(3, ge=1, description="generated sources: at most this many constraints a prompt")

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds):
        if kinds is not None:
            from spi.instruction_tasks import check_kinds

            check_kinds(kinds)
        return kinds


class BaselineConfig(Section):
    names: list[str] = Field(default_factory=lambda: ["base-sampled", "best-of-n"],
                             description="baseline systems (spi.systems.baseline_names(): the registered ones)")
    weak_to_strong_tuned: str | None = None
    weak_to_strong_untuned: str | None = None
    args_weight: float = Field(1.0, description="ARGS: w of log p(token) + w * reward(prefix)")
    args_proposal: Literal["topk", "sampled"] = Field(
        "topk", description="ARGS: the k most likely tokens (the ARGS paper), or k tokens sampled from the "
                            "temperature/top-k/top-p warped distribution, scored with log p_warped (IRO's code)")
    args_candidates: int = Field(10, ge=1, description="ARGS: candidate tokens per step (k)")
    budget_matched_best_of_n: bool = Field(
        False,
        description="also run best-of-n:N_k with N_k matching spi-k's budget_matched_unit, training included",
    )
    budget_matched_unit: Literal["generated_tokens", "forward_tokens"] = Field(
        "generated_tokens",
        description="what budget-matched Best-of-N matches per instruction: generated tokens (rollouts "
                    "amortised), or forward tokens through every model (policy, value models, reward, "
                    "weak-to-strong pair, value fitting; needs the best-of-n baseline to measure a leaf)",
    )

    @field_validator("names")
    @classmethod
    def _registered(cls, names):
        from spi.systems import baseline_names

        known = baseline_names()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown baseline {', '.join(map(repr, unknown))} (registered: {', '.join(known)})")
        return names

    @model_validator(mode="after")
    def _forward_match_measures_best_of_n(self):
        if self.budget_matched_best_of_n and self.budget_matched_unit == "forward_tokens" and "best-of-n" not in self.names:
            raise ValueError("baselines.budget_matched_unit 'forward_tokens' needs 'best-of-n' in baselines.names: "
                             "its decode measures a Best-of-N leaf's forward tokens")
        return self


class EvaluationConfig(Section):
    task: Literal["alpaca_eval", "ifeval"] = Field(
        "alpaca_eval", description="alpaca_eval: judged against references; ifeval: every constraint checked "
                                   "by the verifiers (IFEval's four accuracies), no judge, no references")
    eval_set: str = Field("builtin", description="alpaca_eval: 'builtin', or an AlpacaEval JSON/JSONL file or "
                                                 "folder; ifeval: a prompt-set source (generated:heldout, "
                                                 "ifbench:test, an IFEval-schema JSONL file, a hub id)")
    n_instructions: int | None = Field(32, ge=1)
    subset: Literal["first", "stratified"] = "first"
    judge: str = Field("local:text-bt", description="judge spec; see evaluation/judges.py")
    reference_generator: str = Field("base-greedy", description="for the builtin set: who wrote the references")

    @model_validator(mode="after")
    def _ifeval_source(self):
        if self.task == "ifeval" and self.eval_set == "builtin":
            raise ValueError("evaluation.eval_set must be a prompt-set source with constraints (generated:heldout, "
                             "ifbench:test, an IFEval-schema JSONL file, a hub id) when evaluation.task is 'ifeval'")
        if self.task == "ifeval" and self.subset == "stratified":
            raise ValueError("evaluation.subset 'stratified' needs AlpacaEval's dataset column; use 'first' with "
                             "evaluation.task 'ifeval'")
        return self


class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="MLflow URI; default a SQLite file in the workdir")
    store_url: str | None = Field(None, description="SQLAlchemy URL; default a SQLite file in the workdir")
    experiment: str | None = Field(None, description="MLflow experiment; default the recipe name")
    registered_model: str | None = Field(None, description="registry name for value models; default '<name>-value'")
    promotion_margin: float = Field(0.0, ge=0, description="win-rate points a candidate must gain over the champion")


class ExecutionConfig(Section):
    workdir: str = Field("runs", description="where stage outputs are written")
    threads: int | None = Field(None, ge=1, description="torch threads; null = torch's default")
    task_runner: Literal["thread", "dask"] = Field(
        "thread", description="sharded flows: Prefect's thread pool in the flow process, or Dask (prefect-dask)"
    )
    workers: int = Field(1, ge=1, description="thread: pool size; dask: LocalCluster workers when no dask_address")
    dask_address: str | None = Field(None, description="existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    shard_prompts: int = Field(64, ge=1, description="prompts per shard (one Prefect task each)")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="generation backend of the shards")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs that serve the policy together")

    @model_validator(mode="after")
    def _tensor_parallel_on_vllm(self):
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise ValueError("execution.tensor_parallel_size > 1 needs execution.backend 'vllm' (the transformers "
                             "backend runs the policy on one device)")
        return self


class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    policy: PolicyConfig = PolicyConfig()
    sampling: SamplingConfig = SamplingConfig()
    reward: RewardConfig = RewardConfig()
    value: ValueConfig = ValueConfig()
    search: SearchConfig = SearchConfig()
    iterations: IterationsConfig = IterationsConfig()
    prompts: PromptsConfig = PromptsConfig()
    baselines: BaselineConfig = BaselineConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    tracking: TrackingConfig = TrackingConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @model_validator(mode="after")
    def _reward_reads_whole_responses(self):
        cut = self.reward.max_length
        if cut is not None and self.reward.kind != "verifier" and cut < self.sampling.max_new_tokens:
            warnings.warn(f"reward.max_length ({cut}) is below sampling.max_new_tokens ({self.sampling.max_new_tokens}): "
                          "the reward model reads only the first tokens of long responses (null reads up to "
                          "the model config's length)", RecipeWarning, stacklevel=2)
        return self

    @property
    def digest(self) -> str:
        return digest_of(self.model_dump(mode="json"))

    def section_digest(self, *sections: str) -> str:
        data = self.model_dump(mode="json")
        return digest_of({s: data[s] for s in sections})

    def with_overrides(self, overrides: dict) -> Recipe:
        return parse_recipe(_deep_merge(self.model_dump(mode="json"), overrides), source="overrides")


def digest_of(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["search.width=2", "iterations.betas=[1,2]"]`` into a nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override '{item}' must look like section.field=value")
        dotted, raw = item.split("=", 1)
        node = nested
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return nested


def parse_recipe(data, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in err.errors()
        )
        raise RecipeError(f"{source}: invalid recipe: {problems}") from None


def _recipe_file(name: str | Path, folder: Path | None = None) -> Path | None:
    """The recipe file ``name`` names: a file (relative to ``folder`` when given), else a built-in recipe."""
    for candidate in ((folder or Path()) / name, BUILTIN_RECIPES / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def _read_recipe_data(path: Path, seen: tuple) -> dict:
    """A recipe file's mapping; ``extends: NAME`` (a built-in name, or a file beside this one) starts
    from that recipe's settings, this file's own merged over them."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or "extends" not in data:
        return data
    data = dict(data)
    parent = str(data.pop("extends"))
    parent_path = _recipe_file(parent, path.parent)
    if parent_path is None:
        raise RecipeError(f"{path}: extends '{parent}', which is neither a file beside it nor a built-in recipe")
    if parent_path.resolve() in seen:
        raise RecipeError(f"{path}: 'extends' makes a cycle through {parent_path}")
    base = _read_recipe_data(parent_path, (*seen, path.resolve()))
    if not isinstance(base, dict):
        raise RecipeError(f"{parent_path}: a recipe must be a YAML mapping")
    return _deep_merge(base, data)


def load_recipe(name_or_path: str | Path, overrides: dict | None = None) -> Recipe:
    """Load a recipe by built-in name (``smoke``, ``paper``, ...) or path to a YAML file."""
    path = _recipe_file(name_or_path)
    if path is None:
        known = ", ".join(sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml")))
        raise RecipeError(f"recipe '{name_or_path}' is neither a file nor a built-in recipe ({known})")
    data = _read_recipe_data(path, seen=())
    if overrides:
        data = _deep_merge(data or {}, overrides)
    return parse_recipe(data, source=str(path))
