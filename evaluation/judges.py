"""Pairwise judges and the judgement cache.

A judge compares a model's output with a reference output for an instruction and returns a preference
p in [1, 2] (1 = reference better, 2 = model output better), AlpacaEval's convention with the reference
as output_1. Every judge has an ``identity``: a string naming its model and every setting that changes
its answers; the cache keys on (identity, instruction, reference, output), so a changed judge is never
served stale answers.

Registry (:func:`make_judge`): ``length`` (length-only baseline, also the dummy for tests), ``reward``
(a :class:`spi.reward.RewardModel`), ``llm`` (a local causal LM following the weighted annotator's
protocol), ``trained`` (a head trained by :func:`evaluation.trained_judge.train_judge`), and
``alpaca_eval`` (the official API annotators through alpaca_eval, needs an OpenAI key).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Judge(Protocol):
    identity: str

    def judge(self, instructions: Sequence[str], outputs: Sequence[str], references: Sequence[str]) -> list[float]:
        """Preferences in [1, 2] (2 = output better than reference), one per instruction."""


JUDGES: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str):
    def decorator(factory):
        JUDGES[name] = factory
        return factory

    return decorator


def make_judge(name: str, **kwargs) -> Judge:
    """Build a registered judge by name (see module docstring)."""
    if name not in JUDGES:
        raise KeyError(f"unknown judge '{name}'; known: {', '.join(sorted(JUDGES))}")
    return JUDGES[name](**kwargs)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def require_independent_judge(judge_identity: str, reward_identity: str | None, *, allow_same: bool = False) -> None:
    """Refuse to score an experiment with the reward model that trained it (unless ``allow_same``)."""
    if reward_identity and not allow_same and reward_identity in judge_identity:
        raise ValueError(
            f"the judge ({judge_identity}) is the reward model used for training ({reward_identity}); "
            "pick another judge or pass allow_same=True and report it"
        )


# ----------------------------------------------------------------------------- cache
class JudgementCache:
    """SQLite cache of preferences keyed by (judge identity, instruction, reference, output)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, judge TEXT, preference REAL)")

    def _connect(self):
        return sqlite3.connect(self.path, timeout=30)

    @staticmethod
    def key(identity: str, instruction: str, reference: str, output: str) -> str:
        return _digest(identity, instruction, reference, output)

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        found = {}
        with self._lock, self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, preference FROM judgements WHERE key IN ({marks})", chunk))
        return found

    def put_many(self, identity: str, items: dict[str, float]) -> None:
        with self._lock, self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO judgements (key, judge, preference) VALUES (?, ?, ?)",
                [(k, identity, float(v)) for k, v in items.items()],
            )

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]


def judge_pairs(
    judge: Judge,
    instructions: Sequence[str],
    outputs: Sequence[str],
    references: Sequence[str],
    *,
    cache: JudgementCache | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Judge every (instruction, output, reference), asking the judge only for what the cache lacks.

    Each batch is written to the cache as soon as it is judged, so a failure in a later batch keeps
    the earlier judgements. Returned preferences are checked to lie in [1, 2].
    """
    if not (len(instructions) == len(outputs) == len(references)):
        raise ValueError("instructions, outputs and references must have the same length")
    keys = [JudgementCache.key(judge.identity, i, r, o) for i, o, r in zip(instructions, outputs, references, strict=False)]
    known = cache.get_many(keys) if cache is not None else {}
    todo = [n for n, k in enumerate(keys) if k not in known]
    todo = list(dict.fromkeys(todo))
    for start in range(0, len(todo), batch_size):
        rows = todo[start:start + batch_size]
        prefs = judge.judge([instructions[n] for n in rows], [outputs[n] for n in rows], [references[n] for n in rows])
        if len(prefs) != len(rows):
            raise RuntimeError(f"judge {judge.identity} returned {len(prefs)} preferences for {len(rows)} pairs")
        new = {}
        for n, p in zip(rows, prefs, strict=False):
            p = float(p)
            if not (math.isfinite(p) and 1.0 <= p <= 2.0):
                raise ValueError(f"judge {judge.identity} returned preference {p} outside [1, 2]")
            new[keys[n]] = p
        if cache is not None:
            cache.put_many(judge.identity, new)
        known.update(new)
    return [known[k] for k in keys]


# ----------------------------------------------------------------------------- judges
@register_judge("length")
class LengthJudge:
    """Length-only baseline: P(output better) = sigmoid(scale * log(len(output) / len(reference)))."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)
        self.identity = f"length:scale={self.scale}"

    def judge(self, instructions, outputs, references):
        return [
            1.0 + _sigmoid(self.scale * math.log((len(o) + 1) / (len(r) + 1))) for o, r in zip(outputs, references, strict=False)
        ]


@register_judge("reward")
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


@register_judge("llm")
class LocalLLMJudge:
    """A local causal LM as pairwise judge, following alpaca_eval's weighted annotator protocol.

    The two answers are shown labelled ``m`` and ``M``; the preference is read from the
    log-probabilities of the two labels at the first answer token (renormalised over the two), and
    each pair is judged in both orders and averaged, which cancels position bias.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", dtype: str = "float32", max_chars: int = 2000,
                 batch_size: int = 4):
        from spi.models import CausalLM

        self.lm = CausalLM.load(model, dtype=dtype)
        self.max_chars, self.batch_size = int(max_chars), int(batch_size)
        tok = self.lm.tokenizer
        self.label_ids = [tok.encode(t, add_special_tokens=False)[0] for t in ("m", "M")]
        if self.label_ids[0] == self.label_ids[1]:
            raise ValueError(f"model {model}: labels m and M share a first token")
        settings = json.dumps([dtype, self.max_chars, JUDGE_SYSTEM, JUDGE_TEMPLATE], sort_keys=True)
        self.identity = f"llm:{model}:{_digest(settings)[:16]}"

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


@register_judge("trained")
def _trained_judge(path: str, **kwargs):
    from .trained_judge import TrainedJudge

    return TrainedJudge.load(path, **kwargs)


@register_judge("alpaca_eval")
class AlpacaEvalAPIJudge:  # pragma: no cover - needs an API key and the network
    """Official AlpacaEval annotators (default weighted_alpaca_eval_gpt4_turbo) through alpaca_eval."""

    def __init__(self, annotators_config: str = "weighted_alpaca_eval_gpt4_turbo", caching_path=None):
        if not os.environ.get("OPENAI_API_KEY"):
            raise RuntimeError("the alpaca_eval judge needs OPENAI_API_KEY (or an OpenAI client config)")
        from alpaca_eval.annotators import PairwiseAnnotator

        self.annotator = PairwiseAnnotator(annotators_config=annotators_config, caching_path=caching_path)
        self.identity = f"alpaca_eval:{annotators_config}"

    def judge(self, instructions, outputs, references):
        pairs = [
            {"instruction": i, "output_1": r, "output_2": o, "generator_1": "reference", "generator_2": "model"}
            for i, o, r in zip(instructions, outputs, references, strict=False)
        ]
        annotated = self.annotator.annotate_pairs(pairs)
        prefs = []
        for a in annotated:
            p = a.get("preference")
            prefs.append(1.5 if p is None or (isinstance(p, float) and math.isnan(p)) or p == 0 else float(p))
        return prefs
