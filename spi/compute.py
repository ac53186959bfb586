"""Compute accounting returned by every decode: tokens and calls per model, wall time per part.

Token counts are real (non-padding) tokens run through a model's forward pass, one count per model:
a value head on the policy's own hidden states (``HeadValueGuide``) runs no model of its own and adds
no value tokens, only value calls.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields


@dataclass
class Compute:
    policy_tokens: int = 0  # tokens run through the policy (prompt prefill included)
    generated_tokens: int = 0  # response tokens produced
    value_tokens: int = 0  # tokens run through separate value backbones (each V_i's own)
    value_calls: int = 0  # scorer evaluations of a row
    reward_calls: int = 0  # reward-model evaluations of a (prompt, response)
    reward_tokens: int = 0  # tokens run through the reward model (its own tokenizer's)
    w2s_tokens: int = 0  # tokens run through weak-to-strong search's tuned and untuned models (both)
    seconds: dict[str, float] = field(default_factory=dict)  # part -> wall seconds

    @contextmanager
    def timed(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    def add(self, other: Compute) -> Compute:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for part, secs in other.seconds.items():
            self.seconds[part] = self.seconds.get(part, 0.0) + secs
        return self

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "seconds"}
        out.update({f"seconds_{part}": round(secs, 4) for part, secs in sorted(self.seconds.items())})
        return out


COUNTS = tuple(f.name for f in fields(Compute) if f.name != "seconds")  # the counters that add up


def charge_reward(reward_model, instructions: list[str], responses: list[str], compute: Compute) -> list[float]:
    """``reward_model``'s scores (``spi.reward``), charged to ``compute``: one reward call per response,
    the tokens it forwarded, the seconds under "reward_forward". A model with only ``score`` (a stand-in
    without a network) forwards no tokens."""
    with compute.timed("reward_forward"):
        if hasattr(reward_model, "score_counted"):
            scores, tokens = reward_model.score_counted(instructions, responses)
        else:
            scores, tokens = reward_model.score(instructions, responses), 0
    compute.reward_calls += len(responses)
    compute.reward_tokens += int(tokens)
    return scores
