"""Checks of a recipe's inputs before the first stage runs (``spi run``; any flow may call them).

    check_models   every model the recipe names (policy, reward, value backbone, weak-to-strong pair,
                   the judge's backbone) is a built-in alias, a local model folder, or a hub id already
                   in the local Hugging Face cache; with HF_HUB_OFFLINE unset a hub id not in the cache
                   is looked up once (a few seconds at most), never downloaded
    check_data     every data file (training prompts, the eval set with its references, the verifier's
                   constraint files) parses in full with the loaders the stages use

Each failure is an :class:`InputError`: one line naming the recipe field, then the file, row and (for
JSON) column, e.g. ``evaluation.eval_set: /x/eval.jsonl, row 12, column 7: invalid JSON: ...``.
Nothing is loaded onto a device and nothing is written but the loaders' caches.
"""

from __future__ import annotations

import os
from pathlib import Path

from spi.config import Recipe

HUB_LOOKUP_TIMEOUT_S = 10.0


class InputError(ValueError):
    """A recipe input that cannot be used; the message starts with the recipe field."""


def check_inputs(recipe: Recipe) -> None:
    check_models(recipe)
    check_data(recipe)


# --------------------------------------------------------------------------- models


def recipe_models(recipe: Recipe) -> list[tuple[str, str]]:
    """(recipe field, model name) of every model the recipe loads."""
    named = [("policy.model", recipe.policy.model)]
    if recipe.reward.kind in ("llm-judge", "hf-classifier"):
        named.append(("reward.model", recipe.reward.model))
    if recipe.value.kind == "backbone" and recipe.value.backbone:
        named.append(("value.backbone", recipe.value.backbone))
    for side in ("tuned", "untuned"):
        name = getattr(recipe.baselines, f"weak_to_strong_{side}")
        if name:
            named.append((f"baselines.weak_to_strong_{side}", name))
    if recipe.evaluation.task == "alpaca_eval":
        named += [("evaluation.judge", m) for m in _judge_models(recipe)]
    return named


def _judge_models(recipe: Recipe) -> list[str]:
    """The models a judge spec names in its argument (llm:MODEL, reward:KIND:MODEL)."""
    from evaluation.judges import judge_kind

    kind, arg = judge_kind(recipe.evaluation.judge)
    kwargs = kind.parse(arg, recipe.model_dump(mode="json")["reward"])
    config = kwargs.get("config")
    models = [kwargs.get("model"), config.get("model") if isinstance(config, dict) else getattr(config, "model", None)]
    if isinstance(config, dict) and config.get("kind") in ("verifier", "preference-head"):
        models[1] = None
    return [m for m in models if m]


def check_models(recipe: Recipe) -> None:
    from spi.models import ModelNotFoundError

    for field, name in recipe_models(recipe):
        try:
            check_model(name)
        except (ModelNotFoundError, OSError, ValueError) as err:
            raise InputError(f"{field}: {' '.join(str(err).split())}") from None
    if recipe.reward.kind == "preference-head":
        head = Path(recipe.reward.head or "").expanduser()
        if not recipe.reward.head or not (head / "head.json").is_file():
            raise InputError(f"reward.head: {recipe.reward.head or '(empty)'} is not a trained head folder "
                             "(no head.json)")


def check_model(name: str) -> None:
    """``name`` can be loaded here without a download surprise; raises with the reason otherwise."""
    from spi.models import BUILTINS, RANDOM_SHAPES, ModelNotFoundError, resolve

    if name in BUILTINS:  # the packaged model registry: built on first use from installed packages
        return
    if name.startswith("random:"):
        if name.split(":")[1] not in RANDOM_SHAPES:
            raise ModelNotFoundError(f"model '{name}': the shape is not one of {', '.join(sorted(RANDOM_SHAPES))}")
        return
    source = resolve(name)  # a folder (with config.json) or a well-formed hub id; else ModelNotFoundError
    if isinstance(source, Path) or _in_hub_cache(source):
        return
    if _offline():
        raise ModelNotFoundError(
            f"model '{name}' is neither a built-in alias ({', '.join(sorted(BUILTINS))}), nor a local folder, "
            "nor in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    _hub_lookup(name)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off")


def _hub_lookup(name: str) -> None:
    """One request to the hub, with a short timeout and no retries."""
    from huggingface_hub import HfApi

    from spi.models import ModelNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_LOOKUP_TIMEOUT_S)
    except Exception as err:  # RepositoryNotFoundError, GatedRepoError, connection errors
        raise ModelNotFoundError(
            f"model '{name}' is not in the local Hugging Face cache and the hub does not give it "
            f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); download it where the hub is "
            "reachable and name the local folder"
        ) from None


# --------------------------------------------------------------------------- data


def check_data(recipe: Recipe) -> None:
    from evaluation.data import load_eval_set
    from spi import pipeline

    r = recipe
    count = r.prompts.offset + r.iterations.count * r.iterations.prompts_per_iteration
    _field("prompts.train", pipeline.train_prompt_set, r, count or None)  # every prompt the iterations use
    if r.evaluation.task == "ifeval":
        _field("evaluation.eval_set", pipeline.eval_prompt_set, r)
    else:
        _field("evaluation.eval_set", load_eval_set, r.evaluation.eval_set, require_references=False)
    if r.reward.kind == "verifier":
        from spi.verifiers import read_prompt_records

        for path in r.reward.constraints:
            _field("reward.constraints", read_prompt_records, path)


def _field(field: str, load, *args, **kwargs):
    try:
        return load(*args, **kwargs)
    except (ValueError, OSError) as err:  # DataError, PromptSetError, a missing or unreadable file
        raise InputError(f"{field}: {' '.join(str(err).split())}") from None
