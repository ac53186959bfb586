"""A toy judge registered with ONE call, for the tests that show a registration reaches every path."""

import contextlib

from evaluation.judges import JUDGES, JudgeSpecError, register_judge

TOY_VERSION = "toy-v1"


class ToyJudge:
    """Prefers outputs that contain the word 'toy': preference 2 - bias, else 1 + bias."""

    def __init__(self, bias: float = 0.25):
        self.bias = float(bias)
        self.identity = f"toy:bias={self.bias}"

    def judge(self, instructions, outputs, references):
        return [2.0 - self.bias if "toy" in o else 1.0 + self.bias for o in outputs]


def _check(kwargs: dict) -> None:
    if not 0.0 <= kwargs.get("bias", 0.25) <= 0.5:
        raise JudgeSpecError(f"toy judge: bias {kwargs['bias']} is not in [0, 0.5]")


@contextlib.contextmanager
def registered_toy_judge():
    """The toy judge registered as ``toy[:BIAS]`` for the duration of the block."""
    register_judge(
        "toy",
        syntax="toy[:BIAS]",
        parse=lambda arg, reward: {"bias": float(arg)} if arg else {},
        fingerprint=lambda arg, reward: TOY_VERSION,
        same_as_reward=lambda arg, reward: reward.get("kind") == "toy",
        check=_check,
    )(ToyJudge)
    try:
        yield ToyJudge
    finally:
        JUDGES.pop("toy", None)
