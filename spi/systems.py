"""The decoding systems compared in an experiment: a registry, each system a setting of the one search.

    base-greedy    W=1, K=1, temperature 0
    base-sampled   W=1, K=1
    best-of-n      W=1, K=W*K, one chunk, final pick by reward
    best-of-n:N    the same with N rows (Best-of-N at another budget)
    blockwise-cd   W=1, K=W*K, L, guided by V_1 with weight 1 (controlled decoding)
    spi-k          W, K, L, guided by sum_{i<=k} V_i / beta_i, final pick by reward
    weak-to-strong W, K, L, guided by log pi_tuned - log pi_untuned of a small pair
    args           W=1, K=top-k candidates, L=1, guided by log pi(token) + w * r(prefix)

A system is declared ONCE with :func:`register`: its name pattern, the value models it reads and their
weights, the extra models it needs, and its search plan. The recipe's baseline list, the experiment,
the sharded path and model loading all read this registry; adding a baseline is one ``register`` call
(in the process that decodes it: Dask workers import this module, not the caller's registrations).
A guided policy (the system plus its value models, betas and base model) is written as a folder by
:func:`write_guided_policy`: that folder is what the model registry holds.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from spi.stagefiles import write_folder

EXTRA_MODELS = ("reward", "weak-to-strong")


@dataclass(frozen=True)
class System:
    """One registered system. ``pattern``: a regular expression matched against the whole name.
    ``plan(match, recipe, base)`` -> SearchSettings (``base``: the recipe's search settings).
    ``values(match)`` -> m, the value models V_1..V_m it reads (0: none); ``weight(i, recipe)`` -> the
    weight of V_{i+1} in its guide (spi-k: 1 / beta_{i+1}).
    ``needs``: extra models among EXTRA_MODELS. ``guide(recipe, policy, reward_model, w2s_models)``:
    the guide of a system that is not steered by value models (None: unguided or value-guided).
    ``baseline``: may be listed in ``baselines.names``. ``fields``: the recipe fields its plan reads
    beyond ``policy``, ``sampling`` and ``search`` (documentation; spi.stages keys the decode on them).
    ``guide_text``: what ``guide`` scores, in words (shown with the system's params)."""

    name: str
    pattern: str
    plan: Callable
    values: Callable = lambda match: 0
    weight: Callable = lambda i, recipe: 1.0
    needs: tuple[str, ...] = ()
    guide: Callable | None = None
    baseline: bool = True
    fields: tuple[str, ...] = ()
    guide_text: str = ""


SYSTEMS: dict[str, System] = {}


def register(system: System) -> System:
    unknown = set(system.needs) - set(EXTRA_MODELS)
    if unknown:
        raise ValueError(f"system '{system.name}': unknown extra models {sorted(unknown)} (known: {EXTRA_MODELS})")
    SYSTEMS[system.name] = system
    return system


def lookup(name: str) -> tuple[System, re.Match]:
    for system in SYSTEMS.values():
        match = re.fullmatch(system.pattern, name)
        if match:
            return system, match
    raise ValueError(f"unknown system '{name}' (known: {', '.join(SYSTEMS)})")


def baseline_names() -> list[str]:
    return [s.name for s in SYSTEMS.values() if s.baseline]


def value_weights(name: str, recipe) -> list[float]:
    """Weights of V_1..V_m in the system's guide: the value models it needs are the first m."""
    system, match = lookup(name)
    return [system.weight(i, recipe) for i in range(system.values(match))]


def value_count(name: str) -> int:
    """How many value models (V_1..V_m) the system reads; it does not depend on the recipe's betas."""
    system, match = lookup(name)
    return system.values(match)


def needs(name: str) -> tuple[str, ...]:
    return lookup(name)[0].needs


def base_settings(recipe):
    from spi.search import SearchSettings

    s, p = recipe.search, recipe.sampling
    return SearchSettings(
        width=s.width, successors=s.successors, chunk_length=s.chunk_length, temperature=p.temperature,
        top_k=p.top_k, top_p=p.top_p, max_new_tokens=p.max_new_tokens, selection=s.selection,
        selection_temperature=s.selection_temperature, final_pick=s.final_pick, batch_prompts=s.batch_prompts,
    )


def value_guide(value_models, weights, policy):
    """sum_i w_i V_i, each V_i read from the policy's hidden state, from its own cached backbone fed the
    policy's tokens, or, for a backbone with another tokenizer, from re-encoded text."""
    from spi.guides import CachedValueGuide, HeadValueGuide, ReencodeValueGuide, WeightedGuide
    from spi.models import same_tokenizer

    parts = []
    for model, weight in zip(value_models, weights, strict=False):
        if model.kind == "policy-head":
            if model.policy_name != policy.name:
                raise ValueError(f"value head was fitted on policy '{model.policy_name}', not '{policy.name}'")
            parts.append((HeadValueGuide(model), weight))
        elif same_tokenizer(model.tokenizer, policy.tokenizer):
            parts.append((CachedValueGuide(model, policy.tokenizer.pad_token_id), weight))
        else:
            parts.append((ReencodeValueGuide(model, policy.tokenizer, policy.system_message), weight))
    return WeightedGuide(parts)


def system_plan(name: str, recipe, policy, value_models=(), reward_model=None, w2s_models=None):
    """(SearchSettings, guide or None) for a named system."""
    system, match = lookup(name)
    settings = system.plan(match, recipe, base_settings(recipe))
    weights = value_weights(name, recipe)
    if weights:
        if len(value_models) < len(weights):
            raise ValueError(f"system '{name}' needs {len(weights)} fitted value models, got {len(value_models)}; "
                             "run the SPI iterations first")
        return settings, value_guide(list(value_models)[:len(weights)], weights, policy)
    if "reward" in system.needs and reward_model is None:
        raise ValueError(f"{name} needs a reward model")
    if "weak-to-strong" in system.needs and not w2s_models:
        raise ValueError(f"{name} needs baselines.weak_to_strong_tuned and _untuned models")
    guide = system.guide(recipe, policy, reward_model, w2s_models) if system.guide else None
    return settings, guide


def system_params(name: str, recipe, value_models=()) -> dict[str, str]:
    """What ``name`` is, as flat strings (MLflow params of its run): the search it runs (W, K, L and
    N = W*K rows, sampling, selection, final pick), its guide, the recipe fields its plan reads, and
    each value model it reads with its weight (and beta, for spi-k). ``value_models``: (name, digest)
    of V_1, V_2, ... as fitted; the first m are the system's."""
    system, match = lookup(name)
    s = system.plan(match, recipe, base_settings(recipe))
    weights = value_weights(name, recipe)
    if len(value_models) < len(weights):
        raise ValueError(f"system '{name}' reads {len(weights)} value models, got {len(value_models)}")
    if weights:
        guide = " + ".join(f"{w:g}*V_{i}" for i, w in enumerate(weights, 1))
    else:
        guide = system.guide_text or "none (samples of the base policy)"
    out = {
        "system": name, "system.kind": system.name, "policy.model": recipe.policy.model,
        "search.W": s.width, "search.K": s.successors, "search.N": s.rows,
        "search.L": s.chunk_length if s.chunk_length is not None else "none (one chunk)",
        "search.proposal": s.proposal, "search.selection": s.selection, "search.final_pick": s.final_pick,
        "sampling.temperature": s.temperature, "sampling.top_k": s.top_k, "sampling.top_p": s.top_p,
        "sampling.max_new_tokens": s.max_new_tokens, "guide": guide, "values.count": len(weights),
    }
    for field in system.fields:
        section, key = field.split(".", 1)
        out[field] = getattr(getattr(recipe, section), key)
    betas = recipe.iterations.betas if system.name == "spi-k" else None
    for i, ((model, digest), w) in enumerate(zip(value_models, weights, strict=False), 1):
        out.update({f"values.V_{i}": f"{model}@{digest}", f"values.V_{i}.weight": w})
        if betas:
            out[f"values.V_{i}.beta"] = betas[i - 1]
    if betas:
        out["iterations.betas"] = betas[: len(weights)]
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in out.items()}


def load_extra_models(name: str, recipe) -> tuple | None:
    """The weak-to-strong pair a system needs (the reward model is the recipe's, loaded by the stage)."""
    if "weak-to-strong" not in needs(name):
        return None
    from spi.models import CausalLM

    b = recipe.baselines
    if not (b.weak_to_strong_tuned and b.weak_to_strong_untuned):
        raise ValueError("weak-to-strong needs baselines.weak_to_strong_tuned and baselines.weak_to_strong_untuned")
    return CausalLM.load(b.weak_to_strong_tuned), CausalLM.load(b.weak_to_strong_untuned)


def best_of_n_rows(name: str, default: int) -> int:
    """N of ``best-of-n`` (``default``) or ``best-of-n:N``."""
    if name == "best-of-n":
        return default
    text = name.split(":", 1)[1]
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"system '{name}': N of best-of-n:N must be a positive integer")
    return int(text)


# --------------------------------------------------------------------------- the built-in systems


def _w2s_guide(recipe, policy, reward_model, w2s_models):
    """log pi_tuned - log pi_untuned on the policy's tokens (cached), or on re-encoded text when the pair's
    tokenizer is not the policy's. A bare model (no tokenizer) is taken to share the policy's."""
    from spi.guides import ImplicitRewardGuide, ReencodeImplicitRewardGuide
    from spi.models import same_tokenizer

    tuned, untuned = (getattr(m, "model", m) for m in w2s_models)  # CausalLM or a bare HF model
    tokenizers = [getattr(m, "tokenizer", policy.tokenizer) for m in w2s_models]
    if not same_tokenizer(*tokenizers):
        b = recipe.baselines
        raise ValueError(f"baselines.weak_to_strong_tuned '{b.weak_to_strong_tuned}' and weak_to_strong_untuned "
                         f"'{b.weak_to_strong_untuned}' do not share a tokenizer: their log-ratio needs one")
    if same_tokenizer(tokenizers[0], policy.tokenizer):
        return ImplicitRewardGuide(tuned, untuned, policy.tokenizer.pad_token_id)
    return ReencodeImplicitRewardGuide(tuned, untuned, tokenizers[0], policy.tokenizer, policy.system_message)


def _args_guide(recipe, policy, reward_model, w2s_models):
    from spi.guides import RewardGuide, TokenLogProbGuide, WeightedGuide

    weight = recipe.baselines.args_weight
    return WeightedGuide([(TokenLogProbGuide(), 1.0), (RewardGuide(reward_model, policy.tokenizer), weight)])


register(System("base-greedy", r"base-greedy", lambda m, r, b: replace(b, width=1, successors=1, temperature=0.0)))
register(System("base-sampled", r"base-sampled", lambda m, r, b: replace(b, width=1, successors=1)))
register(System(
    "best-of-n", r"best-of-n(:.*)?",
    lambda m, r, b: replace(b, width=1, successors=best_of_n_rows(m.group(0), b.rows), chunk_length=None,
                            final_pick="reward"),
))
register(System("blockwise-cd", r"blockwise-cd", lambda m, r, b: replace(b, width=1, successors=b.rows),
                values=lambda m: 1))
register(System("spi-k", r"spi-([0-9]+)", lambda m, r, b: b, baseline=False, fields=("iterations.betas",),
                values=lambda m: int(m.group(1)), weight=lambda i, r: 1.0 / r.iterations.betas[i]))
register(System("weak-to-strong", r"weak-to-strong", lambda m, r, b: b, needs=("weak-to-strong",), guide=_w2s_guide,
                fields=("baselines.weak_to_strong_tuned", "baselines.weak_to_strong_untuned"),
                guide_text="log pi_tuned - log pi_untuned of the weak-to-strong pair"))
register(System(
    "args", r"args",
    lambda m, r, b: replace(b, width=1, successors=r.baselines.args_candidates, chunk_length=1,
                            proposal="topk" if r.baselines.args_proposal == "topk" else "sample", final_pick="value"),
    needs=("reward",), guide=_args_guide,
    fields=("baselines.args_weight", "baselines.args_proposal", "baselines.args_candidates"),
    guide_text="log p(token) + args_weight * reward(prefix); p is pi for top-k proposals, the warped pi when sampled",
))


# --------------------------------------------------------------------------- a guided policy as a folder


def write_guided_policy(out: Path, system: str, recipe, value_dirs: list) -> Path:
    """The folder the model registry holds for ``system``: ``policy.json`` (the system, the base
    model, each value model with its weight and beta, and the recipe: seed, search and sampling
    settings) and the value model folders V_1..V_m."""
    weights = value_weights(system, recipe)
    if len(value_dirs) < len(weights):
        raise ValueError(f"{system} needs {len(weights)} value models, got {len(value_dirs)}")
    betas = recipe.iterations.betas
    values = [{"folder": f"V{i}", "weight": weight, "beta": betas[i - 1] if system.startswith("spi-") else None}
              for i, weight in enumerate(weights, 1)]
    meta = {"system": system, "base_model": recipe.policy.model, "dtype": recipe.policy.dtype, "values": values,
            "recipe": recipe.model_dump(mode="json")}  # seed, search and sampling: how it decodes

    def build(folder: Path) -> None:
        for value, source in zip(values, value_dirs, strict=False):
            shutil.copytree(source, folder / value["folder"])
        (folder / "policy.json").write_text(json.dumps(meta, indent=1))

    return write_folder(out, build)


def read_guided_policy(folder: Path) -> tuple[str, list[Path], dict]:
    """(system, value model folders in order, policy.json) of a folder written by write_guided_policy."""
    folder = Path(folder)
    meta_path = folder / "policy.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} is not a guided policy folder (no policy.json)")
    meta = json.loads(meta_path.read_text())
    return meta["system"], [folder / v["folder"] for v in meta["values"]], meta
