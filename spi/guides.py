"""Scores that steer the chunk-level beam search.

A guide sees the search at each chunk boundary (``Boundary``) and returns one score per row; it is told
when rows are reordered. pi_k's score sum_i V_i / beta_i is a ``WeightedGuide`` of value guides.
Implementations differ only in how they read a row:
- ``HeadValueGuide``: a value head on the policy's own hidden state (costs almost nothing);
- ``CachedValueGuide``: a separate value backbone with its own KV cache, fed the same tokens;
- ``ReencodeValueGuide``: the peers' method (decode to text, re-encode prompt + prefix, no cache);
- ``ImplicitRewardGuide``: weak-to-strong search's log pi_tuned - log pi_untuned, both cached;
- ``RewardGuide`` and ``TokenLogProbGuide``: ARGS's w * r(prefix) + log pi(token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spi.compute import Compute
from spi.incremental import IncrementalModel, rowwise
from spi.prompts import chat_prompt_ids


@dataclass
class Boundary:
    new_tokens: torch.Tensor  # [rows, n] tokens since the last boundary (padding where a row had ended)
    new_real: torch.Tensor  # [rows, n] bool, True for tokens that are part of the response
    responses: list[list[int]]  # each row's response tokens so far
    policy_hidden: torch.Tensor  # [rows, H] policy hidden state at each row's last token
    last_logprob: torch.Tensor  # [rows] log pi_0 of each row's last token


class Guide:
    # Whether score() reads Boundary.last_logprob; the search skips a full-vocabulary log_softmax per
    # step when no guide does. Unknown guides are assumed to read it.
    needs_last_logprob = True

    def begin(self, instructions: list[str], prompt_ids: list[list[int]], rows_per_prompt: int, compute: Compute):
        self.instructions = [x for x in instructions for _ in range(rows_per_prompt)]
        self.compute = compute

    def score(self, boundary: Boundary) -> torch.Tensor:
        raise NotImplementedError

    def reorder(self, index: torch.Tensor) -> None:
        self.instructions = [self.instructions[i] for i in index.tolist()]


class HeadValueGuide(Guide):
    needs_last_logprob = False

    def __init__(self, value_model):
        self.value_model = value_model

    def score(self, boundary):
        with self.compute.timed("value_forward"):
            self.compute.value_calls += len(boundary.responses)
            return rowwise(self.value_model.head_values, boundary.policy_hidden).float()


class CachedValueGuide(Guide):
    needs_last_logprob = False

    def __init__(self, value_model, pad_id: int):
        self.value_model, self.pad_id = value_model, pad_id

    def begin(self, instructions, prompt_ids, rows_per_prompt, compute):
        super().begin(instructions, prompt_ids, rows_per_prompt, compute)
        self.model = IncrementalModel(self.value_model.backbone, compute, "value_tokens", "value_forward")
        self.last = self.model.prefill(prompt_ids, rows_per_prompt, self.pad_id)

    def score(self, boundary):
        hidden = self.model.feed(boundary.new_tokens, boundary.new_real)
        count = boundary.new_real.sum(-1)
        last_index = (count - 1).clamp_min(0)
        chunk_last = hidden[torch.arange(hidden.shape[0]), last_index]
        self.last = torch.where((count > 0)[:, None], chunk_last, self.last)
        with self.compute.timed("value_forward"):
            self.compute.value_calls += len(boundary.responses)
            return rowwise(self.value_model.head_values, self.last).float()

    def reorder(self, index):
        super().reorder(index)
        self.model.reorder(index)
        self.last = self.last[index]


class ReencodeValueGuide(Guide):
    """Decode each row to text and run the value model on prompt + prefix from scratch."""

    needs_last_logprob = False

    def __init__(self, value_model, policy_tokenizer):
        self.value_model, self.policy_tokenizer = value_model, policy_tokenizer

    def score(self, boundary):
        with self.compute.timed("text_decode"):
            texts = self.policy_tokenizer.batch_decode(list(boundary.responses), skip_special_tokens=True)
        tokenizer = self.value_model.tokenizer
        with self.compute.timed("text_decode"):
            inputs = [
                chat_prompt_ids(tokenizer, x) + tokenizer(t, add_special_tokens=False)["input_ids"]
                for x, t in zip(self.instructions, texts, strict=True)
            ]
        with self.compute.timed("value_forward"):
            values = self.value_model.score_sequences(inputs, pad_id=tokenizer.pad_token_id)
        self.compute.value_tokens += sum(len(i) for i in inputs)
        self.compute.value_calls += len(inputs)
        return values.float()


class ImplicitRewardGuide(Guide):
    """Weak-to-strong search: sum over response tokens of log pi_tuned - log pi_untuned."""

    needs_last_logprob = False

    def __init__(self, tuned_model, untuned_model, pad_id: int):
        self.models, self.pad_id = (tuned_model, untuned_model), pad_id

    def begin(self, instructions, prompt_ids, rows_per_prompt, compute):
        super().begin(instructions, prompt_ids, rows_per_prompt, compute)
        self.incremental, self.next_logprobs = [], []
        for model in self.models:
            inc = IncrementalModel(model, compute, "value_tokens", "value_forward")
            hidden = inc.prefill(prompt_ids, rows_per_prompt, self.pad_id)
            self.incremental.append(inc)
            self.next_logprobs.append(torch.log_softmax(inc.logits(hidden), -1))
        self.total = torch.zeros(len(self.instructions))

    def score(self, boundary):
        real = boundary.new_real
        delta = torch.zeros(real.shape)
        for i, inc in enumerate(self.incremental):
            hidden = inc.feed(boundary.new_tokens, real)
            logprobs = torch.log_softmax(inc.logits(hidden), -1)
            previous = torch.cat([self.next_logprobs[i][:, None], logprobs[:, :-1]], dim=1)
            token_lp = previous.gather(-1, boundary.new_tokens[..., None]).squeeze(-1)
            delta += (1 if i == 0 else -1) * token_lp * real
            count = real.sum(-1)
            last = logprobs[torch.arange(len(count)), (count - 1).clamp_min(0)]
            self.next_logprobs[i] = torch.where((count > 0)[:, None], last, self.next_logprobs[i])
        self.total = self.total + delta.sum(-1)
        self.compute.value_calls += len(boundary.responses)
        return self.total.clone()

    def reorder(self, index):
        super().reorder(index)
        for i, inc in enumerate(self.incremental):
            inc.reorder(index)
            self.next_logprobs[i] = self.next_logprobs[i][index]
        self.total = self.total[index]


class RewardGuide(Guide):
    """r(x, prefix) from a reward model on the decoded prefix (ARGS's per-token reward)."""

    needs_last_logprob = False

    def __init__(self, reward_model, policy_tokenizer):
        self.reward_model, self.policy_tokenizer = reward_model, policy_tokenizer

    def score(self, boundary):
        with self.compute.timed("text_decode"):
            texts = self.policy_tokenizer.batch_decode(list(boundary.responses), skip_special_tokens=True)
        with self.compute.timed("reward_forward"):
            scores = self.reward_model.score(self.instructions, texts)
        self.compute.reward_calls += len(texts)
        return torch.tensor(scores, dtype=torch.float32)


class TokenLogProbGuide(Guide):
    def score(self, boundary):
        return boundary.last_logprob.float()


class WeightedGuide(Guide):
    """sum_i weight_i * guide_i: pi_k's sum_i V_i / beta_i, or ARGS's log pi + w * r."""

    def __init__(self, parts: list[tuple[Guide, float]]):
        if not parts:
            raise ValueError("a weighted guide needs at least one part")
        self.parts = parts

    @property
    def needs_last_logprob(self):
        return any(getattr(guide, "needs_last_logprob", True) for guide, _ in self.parts)

    def begin(self, instructions, prompt_ids, rows_per_prompt, compute):
        for guide, _ in self.parts:
            guide.begin(instructions, prompt_ids, rows_per_prompt, compute)

    def score(self, boundary):
        return sum(weight * guide.score(boundary) for guide, weight in self.parts)

    def reorder(self, index):
        for guide, _ in self.parts:
            guide.reorder(index)
