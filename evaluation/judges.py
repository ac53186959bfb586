"""Pairwise judges, the one registry of judge kinds, and the judgement cache.

A judge compares a model's output with a reference output for an instruction and returns a preference
p in [1, 2] (1 = reference better, 2 = model output better), AlpacaEval's convention with the reference
as output_1. Every judge has an ``identity``: a string naming its model and every setting that changes
its answers; the cache keys on (identity, instruction, reference, output), so a changed judge is never
served stale answers.

A recipe, ``spi eval judge`` and the Prefect form name a judge by a spec, ``KIND`` or ``KIND:ARG``.
:func:`register_judge` registers a kind once, with everything the rest of the code asks of it: how the
spec's argument is parsed into the factory's keywords, what besides the spec identifies its answers
(for stage keys, without loading it), whether it is the recipe's reward model, and whether it can be
built here at all. The built-in kinds:

    length | length:SCALE          length-only baseline (the dummy for tests)
    reward | reward:KIND:MODEL    a reward model as judge (``reward`` alone = the recipe's reward model,
                                  refused unless allowed: it would grade its own homework)
    llm | llm:MODEL               a local causal LM as pairwise judge
    trained:FOLDER                a judge folder written by evaluation.trained_judge or evaluation.cross_encoder
    local | local:NAME            a trained judge folder: NAME, $SPI_CACHE_DIR/judges/NAME or the package's
                                  judges_data/NAME (``text-bt``, the default: text statistics + length,
                                  with offsets for the AlpacaEval instructions;
                                  ``minilm-bt``: MiniLM embeddings + length; both ship trained, else are
                                  trained on first use from the AlpacaEval data; ``minilm-ce`` by
                                  ``spi eval train-judge --kind cross-encoder``)
    alpaca_eval | alpaca_eval:CONFIG   the official API annotators (OPENAI_API_KEY or a client config)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from spi.stagefiles import tree_digest


@runtime_checkable
class Judge(Protocol):
    identity: str

    def judge(self, instructions: Sequence[str], outputs: Sequence[str], references: Sequence[str]) -> list[float]:
        """Preferences in [1, 2] (2 = output better than reference), one per instruction."""


class JudgeSpecError(ValueError):
    """A judge spec that cannot be resolved; the message says what to do."""


def _no_argument(arg: str, reward: dict | None) -> dict:
    if arg:
        raise JudgeSpecError(f"takes no argument, got '{arg}'")
    return {}


@dataclass(frozen=True)
class JudgeKind:
    """A registered kind of judge. The hooks take the spec's argument (after the first ':') and the
    recipe's reward section (a dict, None outside a recipe)."""

    name: str
    factory: Callable[..., Judge]  # keyword arguments -> the judge
    syntax: str  # the spec's form, shown in errors, ``--help`` and the Prefect form
    parse: Callable[[str, dict | None], dict] = _no_argument  # -> the factory's keyword arguments
    fingerprint: Callable[[str, dict | None], str | None] = lambda arg, reward: None  # identity beyond the spec
    same_as_reward: Callable[[str, dict], bool] = lambda arg, reward: False  # is it the training reward?
    check: Callable[[dict], None] = lambda kwargs: None  # can it be built here? raises JudgeSpecError


JUDGES: dict[str, JudgeKind] = {}
DEFAULT_LOCAL_JUDGE = "text-bt"


def register_judge(name: str, *, syntax: str | None = None, **hooks):
    """Decorator registering a judge factory (a class or function) under ``name``; ``hooks`` are the
    optional :class:`JudgeKind` fields (parse, fingerprint, same_as_reward, check)."""

    def decorator(factory):
        JUDGES[name] = JudgeKind(name, factory, syntax or name, **hooks)
        return factory

    return decorator


def split_spec(spec: str) -> tuple[str, str]:
    name, _, arg = str(spec).partition(":")
    return name.strip(), arg.strip()


def judge_syntaxes() -> str:
    """The registered judges' spec forms, for messages and help texts."""
    return ", ".join(kind.syntax for kind in JUDGES.values())


def judge_kind(spec: str) -> tuple[JudgeKind, str]:
    """(the registered kind of ``spec``, its argument); an unknown kind names the registered ones."""
    name, arg = split_spec(spec)
    if name not in JUDGES:
        raise JudgeSpecError(f"unknown judge '{spec}': registered judges are {judge_syntaxes()}")
    return JUDGES[name], arg


def _parsed(spec: str, reward: dict | None, overrides: dict) -> tuple[JudgeKind, dict]:
    """(the kind of ``spec``, its factory's keyword arguments; ``overrides`` win over the parsed argument)."""
    kind, arg = judge_kind(spec)
    try:
        kwargs = kind.parse(arg, reward)
    except (ValueError, TypeError) as err:
        raise JudgeSpecError(f"judge '{spec}': {err} (form: {kind.syntax})") from err
    return kind, {**kwargs, **overrides}


def check_judge_available(spec: str, reward: dict | None = None, **overrides) -> None:
    """Fail early (before any model loads or stage runs) when ``spec`` cannot be resolved here."""
    kind, kwargs = _parsed(spec, reward, overrides)
    kind.check(kwargs)


def resolve_judge(spec: str, reward: dict | None = None, **overrides) -> Judge:
    """The judge ``spec`` names, built by its registered factory (``reward``: the recipe's reward section;
    ``overrides``: keyword arguments of the factory, e.g. ``spi eval judge --judge-arg``)."""
    kind, kwargs = _parsed(spec, reward, overrides)
    kind.check(kwargs)
    return kind.factory(**kwargs)


def judge_fingerprint(spec: str, reward: dict | None = None) -> str:
    """What identifies the judge's answers, computed without loading it (for stage keys)."""
    kind, arg = judge_kind(spec)
    extra = kind.fingerprint(arg, reward)
    return spec if extra is None else f"{spec}@{extra}"


def check_independent(spec: str, reward: dict, allow_same: bool = False) -> None:
    """Refuse a judge that is the recipe's reward model (the experiment optimised against it)."""
    kind, arg = judge_kind(spec)
    if not allow_same and kind.same_as_reward(arg, reward):
        raise JudgeSpecError(
            f"evaluation.judge '{spec}' is the reward model the experiment was trained on "
            f"({reward.get('kind')}:{reward.get('model')}); pick another judge "
            "(e.g. local:text-bt or length) or allow it explicitly and report it"
        )


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def digest_parts(*parts: str) -> str:
    """sha256 of the parts, each ended by a NUL byte (judge identities and judgement-cache keys)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


# ----------------------------------------------------------------------------- built-in judges
@register_judge("length", syntax="length[:SCALE]", parse=lambda arg, reward: {"scale": float(arg)} if arg else {})
class LengthJudge:
    """Length-only baseline: P(output better) = sigmoid(scale * log(len(output) / len(reference)))."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)
        self.identity = f"length:scale={self.scale}"

    def judge(self, instructions, outputs, references):
        return [
            1.0 + _sigmoid(self.scale * math.log((len(o) + 1) / (len(r) + 1))) for o, r in zip(outputs, references, strict=False)
        ]


def _reward_config(arg: str, reward: dict | None):
    """``reward:KIND:MODEL``'s reward model, or with no argument the recipe's (the default one outside a recipe)."""
    from spi.config import RewardConfig

    if not arg:
        return RewardConfig(**(reward or {}))
    kind, _, model = arg.partition(":")
    return RewardConfig(kind=kind, model=model)


def _reward_is_training_reward(arg: str, reward: dict) -> bool:
    kind, _, model = arg.partition(":")
    return not arg or (kind == reward.get("kind") and model == reward.get("model"))


@register_judge(
    "reward",
    syntax="reward[:KIND:MODEL]",
    parse=lambda arg, reward: {"config": _reward_config(arg, reward)},
    fingerprint=lambda arg, reward: None if arg else json.dumps(reward, sort_keys=True),
    same_as_reward=_reward_is_training_reward,
)
class RewardJudge:
    """P(output better) = sigmoid(r(output) - r(reference)) from a :class:`spi.reward.RewardModel`."""

    def __init__(self, reward_model=None, config=None, batch_size: int = 16):
        if reward_model is None:
            from spi.reward import load_reward

            reward_model = load_reward(config)
        self.reward_model = reward_model
        self.identity = f"reward:{reward_model.identity}"

    def judge(self, instructions, outputs, references):
        r_out = self.reward_model.score(list(instructions), list(outputs))
        r_ref = self.reward_model.score(list(instructions), list(references))
        return [1.0 + _sigmoid(float(a) - float(b)) for a, b in zip(r_out, r_ref, strict=False)]


JUDGE_SYSTEM = (
    "You compare two answers to the same instruction and decide which one a careful human expert would "
    "prefer: the more helpful, correct, complete and clear answer. Length alone is not a merit."
)
JUDGE_TEMPLATE = (
    "Instruction:\n{instruction}\n\n"
    "Answer (m):\n{output_1}\n\n"
    "Answer (M):\n{output_2}\n\n"
    "Which answer is better? Reply with one character: m or M."
)


DEFAULT_LLM_JUDGE = "smollm2-135m-instruct"


@register_judge(
    "llm",
    syntax="llm[:MODEL]",
    parse=lambda arg, reward: {"model": arg} if arg else {},
    same_as_reward=lambda arg, reward: reward.get("kind") == "llm-judge"
    and (arg or DEFAULT_LLM_JUDGE) == reward.get("model"),
)
class LocalLLMJudge:
    """A local causal LM as pairwise judge, following alpaca_eval's weighted annotator protocol.

    The two answers are shown labelled ``m`` and ``M``; the preference is read from the
    log-probabilities of the two labels at the first answer token (renormalised over the two), and
    each pair is judged in both orders and averaged, which cancels position bias.
    """

    def __init__(self, model: str = DEFAULT_LLM_JUDGE, dtype: str = "float32", max_chars: int = 2000,
                 batch_size: int = 4):
        from spi.models import CausalLM

        self.lm = CausalLM.load(model, dtype=dtype)
        self.max_chars, self.batch_size = int(max_chars), int(batch_size)
        tok = self.lm.tokenizer
        self.label_ids = [tok.encode(t, add_special_tokens=False)[0] for t in ("m", "M")]
        if self.label_ids[0] == self.label_ids[1]:
            raise ValueError(f"model {model}: labels m and M share a first token")
        settings = json.dumps([dtype, self.max_chars, JUDGE_SYSTEM, JUDGE_TEMPLATE], sort_keys=True)
        self.identity = f"llm:{model}:{digest_parts(settings)[:16]}"

    def _prompt(self, instruction, first, second) -> str:
        cut = self.max_chars
        user = JUDGE_TEMPLATE.format(instruction=instruction[:cut], output_1=first[:cut], output_2=second[:cut])
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{JUDGE_SYSTEM}\n\n{user}\nAnswer: "

    def label_probabilities(self, prompts: list[str]) -> list[float]:
        """P(label M) renormalised over {m, M} for each prompt."""
        import torch

        tok = self.lm.tokenizer
        tok.padding_side = "left"
        probs = []
        for start in range(0, len(prompts), self.batch_size):
            batch = tok(prompts[start:start + self.batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False)
            with torch.no_grad():
                logits = self.lm.model(**batch).logits[:, -1, :].float()
            pair = torch.log_softmax(logits, dim=-1)[:, self.label_ids]
            probs.extend(torch.softmax(pair, dim=-1)[:, 1].tolist())
        return probs

    def judge(self, instructions, outputs, references):
        forward = [self._prompt(i, r, o) for i, o, r in zip(instructions, outputs, references, strict=False)]  # ours = M
        swapped = [self._prompt(i, o, r) for i, o, r in zip(instructions, outputs, references, strict=False)]  # ours = m
        p_fwd = self.label_probabilities(forward)
        p_swp = self.label_probabilities(swapped)
        return [1.0 + 0.5 * (a + (1.0 - b)) for a, b in zip(p_fwd, p_swp, strict=False)]


def _check_trained(kwargs: dict) -> None:
    path = kwargs.get("path")
    if not path or not (Path(path) / "judge_head.json").is_file():
        raise JudgeSpecError(f"judge 'trained:{path or ''}': {path or '(empty)'} is not a trained judge folder")


def _folder_version(folder: Path) -> str:
    """A judge folder's tree_digest (names and bytes of its files, 16 hex), or 'untrained' when there is none."""
    return tree_digest(folder)[:16] if folder.is_dir() else "untrained"


@register_judge(
    "trained",
    syntax="trained:FOLDER",
    parse=lambda arg, reward: {"path": str(Path(arg).expanduser())} if arg else {},
    fingerprint=lambda arg, reward: _folder_version(Path(arg).expanduser().resolve()) if arg else "untrained",
    check=_check_trained,
)
def _trained_judge(path: str, **kwargs):
    return _load_judge_folder(Path(path), **kwargs)


def _load_judge_folder(folder: Path, embed_cache_dir=None, with_length=None, **kwargs):
    """A saved judge folder: a fine-tuned cross-encoder (evaluation.cross_encoder) or a Bradley-Terry head
    on frozen embeddings (evaluation.trained_judge)."""
    from .cross_encoder import CrossEncoderJudge, is_cross_encoder_folder
    from .trained_judge import TrainedJudge

    if is_cross_encoder_folder(folder):
        return CrossEncoderJudge.load(folder, with_length=with_length, **kwargs)
    return TrainedJudge.load(folder, embed_cache_dir=embed_cache_dir, with_length=with_length, **kwargs)


def _local_folder(name: str) -> Path:
    from .judging import local_judge_folder

    return local_judge_folder(name)


def _check_local(kwargs: dict) -> None:
    from .judging import check_local_judge

    check_local_judge(kwargs["name"])


@register_judge(
    "local",
    syntax="local[:NAME]",
    parse=lambda arg, reward: {"name": arg or DEFAULT_LOCAL_JUDGE},
    fingerprint=lambda arg, reward: _folder_version(_local_folder(arg or DEFAULT_LOCAL_JUDGE)),
    check=_check_local,
)
def _local_judge(name: str = DEFAULT_LOCAL_JUDGE, **kwargs):
    """The local judge ``name``, trained first when absent (:func:`evaluation.judging.ensure_local_judge`)."""
    from .judging import ensure_local_judge
    from .trained_judge import default_embed_cache

    kwargs["embed_cache_dir"] = kwargs.get("embed_cache_dir") or default_embed_cache()
    return _load_judge_folder(ensure_local_judge(name), **kwargs)


def _check_alpaca_eval(kwargs: dict) -> None:
    import importlib.util

    config = kwargs.get("client_config_path") or os.environ.get("OPENAI_CLIENT_CONFIG_PATH")
    if not os.environ.get("OPENAI_API_KEY") and not (config and Path(config).is_file()):
        raise JudgeSpecError("the alpaca_eval judge needs OPENAI_API_KEY or an OpenAI client config "
                             "(--judge-arg client_config_path=FILE, or OPENAI_CLIENT_CONFIG_PATH)")
    if importlib.util.find_spec("alpaca_eval") is None:
        raise JudgeSpecError("the alpaca_eval judge needs the alpaca-eval package")


@register_judge(
    "alpaca_eval",
    syntax="alpaca_eval[:CONFIG]",
    parse=lambda arg, reward: {"annotators_config": arg} if arg else {},
    check=_check_alpaca_eval,
)
class AlpacaEvalAPIJudge:
    """Official AlpacaEval annotators (default weighted_alpaca_eval_gpt4_turbo) through alpaca_eval.

    Clients come from alpaca_eval's YAML client config (``client_config_path``: ``default: [{api_key,
    base_url, max_retries}]``), else from OPENAI_API_KEY(S)/OPENAI_API_BASE as read when alpaca_eval is first
    imported. ``caching_path``: alpaca_eval's own annotation cache (None: only the project's). ``cost_usd``:
    alpaca_eval's price of the annotations this judge requested (not those from a cache), ``n_requested``.
    """

    def __init__(self, annotators_config: str = "weighted_alpaca_eval_gpt4_turbo", caching_path=None,
                 client_config_path=None, sleep_time: float | None = None, num_procs: int | None = None):
        from alpaca_eval.annotators import PairwiseAnnotator

        self.annotator = PairwiseAnnotator(annotators_config=annotators_config, caching_path=caching_path)
        options = {"client_config_path": client_config_path, "sleep_time": sleep_time, "num_procs": num_procs}
        self.decoding = {k: v for k, v in options.items() if v is not None}
        self.identity = f"alpaca_eval:{annotators_config}"
        self.cost_usd, self.n_requested = 0.0, 0

    def judge(self, instructions, outputs, references):
        import pandas as pd

        pairs = [
            {"instruction": i, "output_1": r, "output_2": o, "generator_1": "reference", "generator_2": "model"}
            for i, o, r in zip(instructions, outputs, references, strict=False)
        ]
        started = pd.Timestamp.now()
        annotated = self.annotator.annotate_pairs(pairs, **self.decoding)
        prefs = []
        for a in annotated:
            p = a.get("preference")
            prefs.append(1.5 if p is None or (isinstance(p, float) and math.isnan(p)) or p == 0 else float(p))
            date = pd.to_datetime(a.get("preference_date"), errors="coerce")
            if pd.notna(date) and date >= started:  # annotated now, not read from alpaca_eval's cache
                price = a.get("preference_price_per_example")
                self.n_requested += 1
                self.cost_usd += float(price) if price is not None and math.isfinite(float(price)) else 0.0
        return prefs
