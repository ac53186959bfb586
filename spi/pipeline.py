"""The SPI stages as functions that read and write files, so a later stage or a rerun can pick them up.

Stage outputs (all JSON/JSONL, written atomically: a killed run never leaves a half file):
    rollouts.jsonl  one line per prompt: {prompt_index, instruction, prompt_ids,
                    leaves: [{response, response_ids, ended}]}     (response_ids exclude EOS)
    labels.jsonl    one line per prompt: {prompt_index, rewards: [per leaf], best: leaf index}
    value/          a value model folder (spi.value), with its fit report in value.json (what the fit
                    cost included: examples, forward and backward tokens, epochs, seconds)
    <system>.json   {system, outputs: [{instruction, output, generator, dataset, reward}],
                    compute: {...}, mean_reward, beam_changes, boundaries}
Rollouts and labels write their compute (``spi.compute.Compute``) beside them in ``<name>.compute.json``.
Each output has a sidecar ``<name>.key`` holding its stage key (``spi.stages``: the table of what each
key depends on); a stage whose output exists with the same key is skipped. A shard of a stage is the
same function on some prompt indices with the sharded key. The loop over the stages is the flows'
(``flows.loop``), run there with plain calls, Prefect tasks or sharded tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from spi.backends import backend_for, release_engines
from spi.compute import Compute, charge_reward
from spi.config import Recipe, digest_of
from spi.models import CausalLM, load_tokenizer, same_tokenizer
from spi.prompts import reencoded_ids
from spi.reward import load_reward
from spi.search import SearchSettings
from spi.stagefiles import (
    is_done,
    mark_done,
    output_digest,
    read_jsonl,
    write_atomic,
    write_folder,
    write_jsonl,
)
from spi.stages import WHOLE, stage_key
from spi.systems import load_extra_models, system_plan
from spi.value import ValueExample, fit_value, load_value_model, new_value_model
from spi.value_fit_distributed import fit_value_distributed
from spi.value_train import train_settings

log = logging.getLogger("spi")


def seed_for(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:8], 16)


def rollouts_key(recipe: Recipe, iteration: int, value_dirs, layout: str = WHOLE) -> str:
    return stage_key("rollouts", recipe, iteration=iteration,
                     value_models=[output_digest(d) for d in value_dirs], layout=layout)


def labels_key(recipe: Recipe, rollouts, layout: str = WHOLE) -> str:
    return stage_key("labels", recipe, rollouts=output_digest(rollouts), layout=layout)


def value_key(recipe: Recipe, iteration: int, rollouts, labels) -> str:
    return stage_key("value", recipe, iteration=iteration, rollouts=output_digest(rollouts),
                     labels=output_digest(labels))


def decode_key(recipe: Recipe, system: str, value_dirs, eval_set_digest: str, layout: str = WHOLE) -> str:
    return stage_key("decode", recipe, system=system, eval_set=eval_set_digest,
                     value_models=[output_digest(d) for d in value_dirs], layout=layout)


@lru_cache(maxsize=4)
def _policy(name: str, dtype: str, device: str, weights: bool = True) -> CausalLM:
    return CausalLM.load(name, dtype, device, weights)


def load_policy(recipe: Recipe) -> CausalLM:
    """The policy with its system message. On the vLLM backend with backbone value models nothing reads
    its weights (the engine samples, the backbones score), so only its configs load."""
    if recipe.execution.threads:
        torch.set_num_threads(recipe.execution.threads)
    weights = not (recipe.execution.backend == "vllm" and recipe.value.kind == "backbone")
    loaded = _policy(recipe.policy.model, recipe.policy.dtype, recipe.policy.device, weights)
    return replace(loaded, system_message=recipe.policy.system_message)  # shares the loaded weights


_REWARDS: dict = {}


def load_reward_model(recipe: Recipe):
    """The recipe's reward model (one per reward config and constraint set in this process); a verifier
    reward has the constraints of the recipe's training prompts and of its ifeval eval set registered."""
    records = verifier_records(recipe) if recipe.reward.kind == "verifier" else []
    key = (recipe.section_digest("reward"), digest_of(records))
    if key not in _REWARDS:
        if len(_REWARDS) >= 4:
            _REWARDS.pop(next(iter(_REWARDS)))
        _REWARDS[key] = load_reward(recipe.reward, recipe.policy.device, records)
    return _REWARDS[key]


def _shape(recipe: Recipe, source: str) -> dict:
    """prompts.kinds and max_constraints shape generated sources only."""
    if not str(source).startswith("generated:"):
        return {}
    return {"kinds": recipe.prompts.kinds, "max_constraints": recipe.prompts.max_constraints}


def train_prompt_set(recipe: Recipe, count: int):
    """The first ``count`` training prompts (a spi.prompt_sets.PromptSet)."""
    from spi.prompt_sets import load_prompt_set

    return load_prompt_set(recipe.prompts.train, count=count, **_shape(recipe, recipe.prompts.train))


def eval_prompt_set(recipe: Recipe):
    """The ifeval evaluation prompts: evaluation.eval_set, its first evaluation.n_instructions."""
    from spi.prompt_sets import load_prompt_set

    ev = recipe.evaluation
    prompts = load_prompt_set(ev.eval_set, schema="ifeval", count=ev.n_instructions, **_shape(recipe, ev.eval_set))
    if prompts.schema != "ifeval":
        raise ValueError(f"evaluation.eval_set {ev.eval_set!r} has no constraints (IFEval schema: key, prompt, "
                         "instruction_id_list, kwargs) and evaluation.task is 'ifeval'")
    return prompts


def verifier_records(recipe: Recipe) -> list[dict]:
    """IFEval-schema records of every prompt the recipe's verifier reward scores: the training prompts of
    all iterations and, for evaluation.task ifeval, the eval set."""
    count = recipe.prompts.offset + max(1, recipe.iterations.count) * recipe.iterations.prompts_per_iteration
    train = train_prompt_set(recipe, count)
    records = list(train.records) if train.schema == "ifeval" else []
    if recipe.evaluation.task == "ifeval":
        records += eval_prompt_set(recipe).records
    return records


def load_value_models(recipe: Recipe, value_dirs: list[Path]) -> list:
    """V_1..V_k on the recipe's devices: heads on the policy's, backbones on value.device (else the policy's)."""
    value = recipe.value
    return [load_value_model(d, value.device or recipe.policy.device, value.dtype or recipe.policy.dtype)
            for d in value_dirs]


def train_instructions(recipe: Recipe, iteration: int) -> list[str]:
    """The disjoint slice of training prompts for ``iteration`` (1-based)."""
    per = recipe.iterations.prompts_per_iteration
    start = recipe.prompts.offset + (iteration - 1) * per
    return train_prompt_set(recipe, start + per).texts[start:]


def rollout_rows(recipe: Recipe, iteration: int, value_dirs: list[Path], indices=None,
                 progress: bool = True) -> tuple[list[dict], dict]:
    """Rollout records for the prompts ``indices`` (default all) of the iteration's slice, and the compute."""
    policy = load_policy(recipe)
    instructions = train_instructions(recipe, iteration)
    indices = list(range(len(instructions))) if indices is None else list(indices)
    settings, guide = system_plan(rollout_system(iteration), recipe, policy, load_value_models(recipe, value_dirs))
    settings, draws = rollout_plan(recipe, iteration, settings)
    chosen = [instructions[i] for i in indices for _ in range(draws)]
    seeds = [seed_for(recipe.seed, "rollout", iteration, i, *([d] if draws > 1 else [])) for i in indices
             for d in range(draws)]
    result = backend_for(recipe).search(policy, chosen, seeds, settings, guide, reward_model=None, progress=progress)
    rows = []
    for j, i in enumerate(indices):
        searches = result.results[j * draws:(j + 1) * draws]
        if draws == 1:  # the search's leaves are the rollouts
            picked = [(r, leaf) for r in searches for leaf in range(len(r.responses))]
        else:  # one leaf per draw, itself drawn like every chunk before it
            picked = [(r, draw_leaf(r.leaf_values, seed)) for r, seed in
                      zip(searches, seeds[j * draws:(j + 1) * draws], strict=True)]
        leaves = [{"response": r.responses[leaf], "response_ids": r.response_ids[leaf],
                   "ended": len(r.response_ids[leaf]) < settings.max_new_tokens} for r, leaf in picked]
        rows.append({"prompt_index": i, "instruction": instructions[i],
                     "prompt_ids": policy.prompt_ids(instructions[i]), "leaves": leaves})
    return rows, result.compute.as_dict()


def rollout_system(iteration: int) -> str:
    """The policy iteration k samples: pi_0 (plain sampling) for k = 1, else spi-(k-1)'s guided search."""
    return f"spi-{iteration - 1}" if iteration > 1 else "best-of-n"


def rollout_plan(recipe: Recipe, iteration: int, settings: SearchSettings) -> tuple[SearchSettings, int]:
    """(search settings, searches per prompt) of iteration k's rollouts, given the rollout system's settings.

    policy-samples (the theory: V_k is the value of pi_{k-1}, fitted on its samples) draws N = value.
    samples_per_prompt (default W*K) independent samples of pi_{k-1} per prompt. For k = 1 they are N rows
    of plain sampling. For k >= 2 each draw is its own search of width 1: at every chunk boundary one of K
    candidates is drawn with probability proportional to exp(sum V_i / beta_i), which samples chunks from
    pi_0 * exp(sum V_i / beta_i) as K grows, the guided policy the theory defines (the beam search keeps the
    top W instead, and its W*K leaves share prefixes). This costs N*K rows per prompt instead of W*K.
    Otherwise (best-leaf / search-leaves, the source code's choice) the rollouts are the search's W*K leaves.
    """
    value = recipe.value
    if iteration == 1:
        if value.first_iteration != "policy-samples" or value.samples_per_prompt is None:
            return settings, 1
        return replace(settings, width=1, successors=value.samples_per_prompt), 1
    if value.later_iterations != "policy-samples":
        return settings, 1
    draws = value.samples_per_prompt or settings.rows
    return replace(settings, width=1, selection="stochastic", selection_temperature=1.0, final_pick="value"), draws


def draw_leaf(values: list[float], seed: int) -> int:
    """A leaf index drawn with probability proportional to exp(value) (Gumbel-max, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    gumbel = -torch.log(-torch.log(torch.rand(len(values), generator=generator, dtype=torch.float64)))
    return int(torch.argmax(torch.tensor(values, dtype=torch.float64) + gumbel))


def generate_rollouts(recipe: Recipe, iteration: int, value_dirs: list[Path], out: Path,
                      progress: bool = True, key: str | None = None, indices=None) -> Path:
    """Iteration k's rollouts: samples of pi_{k-1} (pi_0 for k = 1, else guided by V_1..V_{k-1}), as
    rollout_plan sets them. ``indices``: only these prompts of the slice (a shard); ``key``: default the unsharded stage's."""
    out = Path(out)
    key = key or rollouts_key(recipe, iteration, value_dirs)
    if is_done(out, key):
        return out
    rows, compute = rollout_rows(recipe, iteration, value_dirs, indices, progress=progress)
    write_jsonl(out, rows)
    write_atomic(out.with_suffix(".compute.json"), json.dumps(compute, indent=2))
    mark_done(out, key)
    return out


def label_rollouts(recipe: Recipe, rollouts: Path, out: Path, key: str | None = None) -> Path:
    """Score every leaf with the reward model; keep the argmax leaf per prompt. The reward calls and
    tokens go to ``<out>.compute.json``."""
    out = Path(out)
    key = key or labels_key(recipe, rollouts)
    if is_done(out, key):
        return out
    reward = load_reward_model(recipe)
    records = read_jsonl(rollouts)
    instructions = [r["instruction"] for r in records for _ in r["leaves"]]
    responses = [leaf["response"] for r in records for leaf in r["leaves"]]
    compute = Compute()
    scores = charge_reward(reward, instructions, responses, compute)
    lines, at = [], 0
    for r in records:
        rewards = scores[at:at + len(r["leaves"])]
        at += len(r["leaves"])
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        lines.append(json.dumps({"prompt_index": r["prompt_index"], "rewards": rewards, "best": best}))
    write_atomic(out, "\n".join(lines) + "\n")
    write_atomic(out.with_suffix(".compute.json"), json.dumps(compute.as_dict(), indent=2))
    mark_done(out, key)
    return out


def value_examples(rollouts: Path, labels: Path, fit_on: str, eos_id: int, reencode=None) -> list[ValueExample]:
    """The fit's examples in the policy's token ids, or, with ``reencode`` = (tokenizer, system message)
    of a value backbone with another tokenizer, in that tokenizer (the text re-encoded)."""
    examples = []
    for record, label in zip(read_jsonl(rollouts), read_jsonl(labels), strict=True):
        chosen = [label["best"]] if fit_on == "best" else range(len(record["leaves"]))
        for i in chosen:
            leaf = record["leaves"][i]
            if reencode is None:
                prompt, response = record["prompt_ids"], leaf["response_ids"] + ([eos_id] if leaf["ended"] else [])
            else:  # no end marker: the search's re-encoding guide reads the decoded text, which has none
                tokenizer, system_message = reencode
                prompt, response = reencoded_ids(tokenizer, record["instruction"], leaf["response"], system_message)
            examples.append(ValueExample(prompt, response, label["rewards"][i], str(record["prompt_index"])))
    return examples


def value_reencoding(recipe: Recipe, policy: CausalLM):
    """(tokenizer, system message) when the value backbone's tokenizer is not the policy's, else None."""
    if recipe.value.kind != "backbone":
        return None
    tokenizer = load_tokenizer(recipe.value.backbone)
    return None if same_tokenizer(tokenizer, policy.tokenizer) else (tokenizer, policy.system_message)


def fit_leaves(recipe: Recipe, iteration: int) -> str:
    """The leaves V_k is fitted on ("all" or "best"): every draw of pi_{k-1} when the rollouts are policy
    samples (V_k is then the value of pi_{k-1}); the argmax-r leaf per prompt for value.first_iteration
    best-leaf; value.fit_on among the search's leaves for value.later_iterations search-leaves."""
    if iteration == 1:
        return "all" if recipe.value.first_iteration == "policy-samples" else "best"
    return "all" if recipe.value.later_iterations == "policy-samples" else recipe.value.fit_on


def fit_value_stage(recipe: Recipe, iteration: int, rollouts: Path, labels: Path, out: Path,
                    progress=None, key: str | None = None) -> Path:
    """Fit V_k afresh (never from V_{k-1}) by Monte Carlo regression on the labelled rollouts."""
    out = Path(out)
    key = key or value_key(recipe, iteration, rollouts, labels)
    if is_done(out, key):
        return out
    policy = load_policy(recipe)
    cfg = recipe.value
    release_engines()  # a vLLM engine's GPU memory goes to the fit; the next search rebuilds it
    torch.manual_seed(seed_for(recipe.seed, "value", iteration))
    reencode = value_reencoding(recipe, policy)
    examples = value_examples(rollouts, labels, fit_leaves(recipe, iteration), policy.eos_ids[0], reencode)
    pad_id = (reencode[0] if reencode else policy.tokenizer).pad_token_id

    def fit_into(folder: Path) -> None:
        if cfg.processes > 1:
            fit_value_distributed(recipe, examples, pad_id, folder, seed_for(recipe.seed, "value", iteration))
            return
        model = new_value_model(cfg.kind, policy.model, policy.name, cfg.backbone, cfg.lora_rank,
                                cfg.dtype or recipe.policy.dtype, cfg.device or recipe.policy.device,
                                cfg.init_from_reward, pooling=cfg.pooling)
        fit_value(model, examples, pad_id, policy.model, cfg.epochs, cfg.learning_rate,
                  cfg.batch_size, cfg.weight_decay, cfg.holdout_fraction, seed=recipe.seed, progress=progress,
                  solver=cfg.solver, train=train_settings(cfg))
        model.save(folder)

    write_folder(out, fit_into)
    mark_done(out, key)
    return out


def decode_rows(recipe: Recipe, system: str, value_dirs: list[Path], instructions: list[str], indices=None,
                datasets=None, w2s_models=None, progress: bool = True) -> tuple[list[dict], dict]:
    """One output row per instruction in ``indices`` (default all), with its reward, and the compute."""
    reward = load_reward_model(recipe)
    policy = load_policy(recipe)
    indices = list(range(len(instructions))) if indices is None else list(indices)
    w2s_models = w2s_models or load_extra_models(system, recipe)
    settings, guide = system_plan(system, recipe, policy, load_value_models(recipe, value_dirs), reward, w2s_models)
    chosen = [instructions[i] for i in indices]
    seeds = [seed_for(recipe.seed, "eval", i) for i in indices]
    result = backend_for(recipe).search(policy, chosen, seeds, settings, guide, reward_model=reward, progress=progress)
    answers = [r.answer for r in result.results]
    known = [r.leaf_rewards[r.chosen] if r.leaf_rewards else None for r in result.results]
    missing = [j for j, k in enumerate(known) if k is None]
    if missing:  # score answers the search did not already score (evaluation cost, not the system's)
        for j, score in zip(missing, reward.score([chosen[j] for j in missing], [answers[j] for j in missing]), strict=True):
            known[j] = score
    rows = [{"prompt_index": i, "instruction": x, "output": y, "generator": system,
             "dataset": datasets[i] if datasets else None, "reward": k,
             "boundaries": r.boundaries, "beam_changes": r.beam_changes, "leaves": _leaves(r)}
            for i, x, y, k, r in zip(indices, chosen, answers, known, result.results, strict=True)]
    return rows, result.compute.as_dict()


def _leaves(result) -> list[dict] | None:
    """Every leaf of a reward-picked search, in row order (Best-of-n for n < N is read from these)."""
    if not result.leaf_rewards:
        return None
    return [{"output": text, "tokens": len(ids), "reward": reward}
            for text, ids, reward in zip(result.responses, result.response_ids, result.leaf_rewards, strict=True)]


def decode_payload(system: str, rows: list[dict], compute: dict) -> dict:
    """A decode stage's output file: AlpacaEval-format outputs (+ reward), compute, summary numbers."""
    outputs = [{k: r[k] for k in ("instruction", "output", "generator", "dataset", "reward")} for r in rows]
    rewards = [r["reward"] for r in rows]
    return {"system": system, "outputs": outputs, "compute": compute, "mean_reward": sum(rewards) / len(rewards),
            "boundaries": sum(r["boundaries"] for r in rows), "beam_changes": sum(r["beam_changes"] for r in rows),
            "leaves": [r.get("leaves") for r in rows]}


def best_of_first(payload: dict, n: int) -> dict:
    """Best-of-n from the decode of a Best-of-N system (N >= n): the highest-reward leaf among the first
    n rows. Rows own their randomness, so these are the rows ``best-of-n:n`` samples itself; its compute
    is the first n leaves' tokens and reward calls, with the shared prompt prefill counted once (policy
    tokens within one per dropped row: a row's last token is never run) and the seconds and reward
    tokens prorated by generated tokens."""
    leaves = payload.get("leaves") or []
    if not leaves or any(not row or len(row) < n for row in leaves):
        raise ValueError(f"best-of-n:{n} needs a Best-of-N decode with at least {n} scored leaves per prompt")
    outputs, generated = [], 0
    for out, row in zip(payload["outputs"], leaves, strict=True):
        first = row[:n]
        best = max(range(n), key=lambda j: (first[j]["reward"], -j))  # first index on ties
        outputs.append({**out, "output": first[best]["output"], "reward": first[best]["reward"],
                        "generator": f"best-of-n:{n}"})
        generated += sum(leaf["tokens"] for leaf in first)
    full = payload["compute"]
    share = generated / full["generated_tokens"] if full.get("generated_tokens") else n / len(leaves[0])
    compute = {key: (round(value * share, 4) if key.startswith("seconds_") else value) for key, value in full.items()}
    compute.update(generated_tokens=generated, policy_tokens=full["policy_tokens"] - full["generated_tokens"] + generated,
                   reward_calls=n * len(outputs), reward_tokens=round(full.get("reward_tokens", 0) * share),
                   derived_from=payload["system"])
    rewards = [o["reward"] for o in outputs]
    return {"system": f"best-of-n:{n}", "outputs": outputs, "compute": compute,
            "mean_reward": sum(rewards) / len(rewards), "boundaries": 0, "beam_changes": 0,
            "leaves": [row[:n] for row in leaves]}


def decode_system(recipe: Recipe, system: str, value_dirs: list[Path], instructions: list[str], out: Path,
                  datasets: list[str] | None = None, w2s_models=None, progress: bool = True,
                  key: str | None = None) -> Path:
    """Answer ``instructions`` with one system; record outputs (AlpacaEval format), rewards and compute.
    ``key``: default the unsharded stage's with the instructions and datasets as the eval set."""
    out = Path(out)
    key = key or decode_key(recipe, system, value_dirs, digest_of([instructions, datasets]))
    if is_done(out, key):
        return out
    rows, compute = decode_rows(recipe, system, value_dirs, instructions, None, datasets, w2s_models, progress)
    write_atomic(out, json.dumps(decode_payload(system, rows, compute), indent=2))
    mark_done(out, key)
    return out


def heldout_instructions(recipe: Recipe, count: int) -> list[str]:
    """Training-distribution prompts after every iteration's slice: never seen by any value fit."""
    start = recipe.prompts.offset + recipe.iterations.count * recipe.iterations.prompts_per_iteration
    return train_prompt_set(recipe, start + count).texts[start:]
