"""Compute accounting returned by every decode: tokens and calls per model, wall time per part."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Compute:
    policy_tokens: int = 0  # tokens run through the policy (prompt prefill included)
    generated_tokens: int = 0  # response tokens produced
    value_tokens: int = 0  # tokens run through separate value/scorer models
    value_calls: int = 0  # scorer evaluations of a row
    reward_calls: int = 0  # reward-model evaluations of a (prompt, response)
    reward_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # part -> wall seconds

    @contextmanager
    def timed(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    def add(self, other: Compute) -> Compute:
        for name in ("policy_tokens", "generated_tokens", "value_tokens", "value_calls", "reward_calls", "reward_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for part, secs in other.seconds.items():
            self.seconds[part] = self.seconds.get(part, 0.0) + secs
        return self

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "seconds"}
        out.update({f"seconds_{part}": round(secs, 4) for part, secs in sorted(self.seconds.items())})
        return out
