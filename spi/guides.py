"""Scores that steer the chunk-level beam search.

A guide sees the search at each chunk boundary (``Boundary``) and returns one score per row; it is told
when rows are reordered. pi_k's score sum_i V_i / beta_i is a ``WeightedGuide`` of value guides.
Implementations differ only in how they read a row:
- ``HeadValueGuide``: a value head on the policy's own hidden state (costs almost nothing);
- ``CachedValueGuide``: a separate value backbone with its own KV cache, fed the same tokens;
- ``ReencodeValueGuide``: the peers' method (decode to text, re-encode prompt + prefix, no cache);
- ``ImplicitRewardGuide``: weak-to-strong search's log pi_tuned - log pi_untuned, both cached;
  ``ReencodeImplicitRewardGuide`` the same for a pair with another tokenizer (re-encoded text);
- ``RewardGuide`` and ``TokenLogProbGuide``: ARGS's w * r(prefix) + log pi(token).

``score_prefixes`` is the token interface of backends that keep no search state (``spi.vllm_search``):
whole (prompt, response so far) rows scored from scratch. Guides that cannot score that way
(``TokenLogProbGuide``: it reads log pi_0 of the sampled token) raise, naming themselves.

Compute: every token a guide runs through a model of its own is charged to the search's ``Compute``:
value backbones to ``value_tokens`` (one count per V_i), the weak-to-strong pair to ``w2s_tokens`` (both
models), the reward model to ``reward_tokens``. A head on the policy's hidden states runs no model: 0.

Devices: a ``Boundary`` lives on the policy's device. A guide moves what it reads to its own model's
device and returns its scores on the boundary's device; ``score_prefixes`` returns them on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spi.compute import Compute, charge_reward
from spi.incremental import IncrementalModel, rowwise
from spi.prompts import reencoded_ids, value_input_ids


@dataclass
class Boundary:
    new_tokens: torch.Tensor  # [rows, n] tokens since the last boundary (padding where a row had ended)
    new_real: torch.Tensor  # [rows, n] bool, True for tokens that are part of the response
    responses: list[list[int]]  # each row's response tokens so far
    policy_hidden: torch.Tensor  # [rows, H] policy hidden state at each row's last token
    policy_hidden_mean: torch.Tensor | None  # [rows, H] mean policy hidden state from the last prompt
    # token on; None unless a guide has needs_hidden_mean
    last_logprob: torch.Tensor  # [rows] log pi_0 of each row's last token

    @property
    def device(self) -> torch.device:
        return self.new_tokens.device


@dataclass
class Prefixes:
    """Rows as whole token sequences, for guides that score from scratch (no KV cache, no policy state)."""

    instructions: list[str]  # one per row
    prompt_ids: list[list[int]]  # the policy's chat prompt of each row
    responses: list[list[int]]  # each row's response tokens so far (an ended row's EOS included)
    compute: Compute
    pad_id: int
    policy_model: object | None = None  # a transformers copy of the policy, for guides reading its hidden states

    def sequences(self) -> list[list[int]]:
        return [value_input_ids(p, r) for p, r in zip(self.prompt_ids, self.responses, strict=True)]


class Guide:
    # Whether score() reads Boundary.last_logprob; the search skips a full-vocabulary log_softmax per
    # step when no guide does. Unknown guides are assumed to read it.
    needs_last_logprob = True
    needs_hidden_mean = False  # whether score() reads Boundary.policy_hidden_mean (kept per row when so)

    def begin(self, instructions: list[str], prompt_ids: list[list[int]], rows_per_prompt: int, compute: Compute):
        self.instructions = [x for x in instructions for _ in range(rows_per_prompt)]
        self.compute = compute

    def score(self, boundary: Boundary) -> torch.Tensor:
        raise NotImplementedError

    def reorder(self, index: torch.Tensor) -> None:
        self.instructions = [self.instructions[i] for i in index.tolist()]

    def score_prefixes(self, prefixes: Prefixes) -> torch.Tensor:
        """One score per row of ``prefixes``, computed from scratch (the vLLM backend's interface)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot score whole prefixes through a token interface, so it cannot "
            "steer the vLLM backend; use execution.backend 'transformers' for this system"
        )


def _score_sequences(value_model, prefixes: Prefixes, policy_model=None) -> torch.Tensor:
    """A value model on prompt + response of every row, from scratch (counted as value tokens/calls)."""
    sequences = prefixes.sequences()
    starts = [len(p) - 1 for p in prefixes.prompt_ids]
    with prefixes.compute.timed("value_forward"):
        values = value_model.score_sequences(sequences, prefixes.pad_id, policy=policy_model, starts=starts)
    prefixes.compute.value_tokens += sum(len(s) for s in sequences)
    prefixes.compute.value_calls += len(sequences)
    return values.float().cpu()


class HeadValueGuide(Guide):
    """A head on the policy's hidden states: no forward of its own (0 value tokens, value calls only).
    ``score_prefixes`` (vLLM) runs a transformers copy of the policy from scratch: those are value tokens."""

    needs_last_logprob = False

    def __init__(self, value_model):
        self.value_model = value_model
        self.needs_hidden_mean = value_model.pooling == "last+mean"

    def score(self, boundary):
        with self.compute.timed("value_forward"):
            self.compute.value_calls += len(boundary.responses)
            features = boundary.policy_hidden
            if self.value_model.pooling == "last+mean":
                features = torch.cat([features, boundary.policy_hidden_mean.to(features.dtype)], -1)
            return rowwise(self.value_model.head_values, features).float().to(boundary.device)

    def score_prefixes(self, prefixes):
        if prefixes.policy_model is None:
            raise ValueError(
                "HeadValueGuide reads the policy's hidden states, which vLLM does not expose: "
                "score_prefixes needs a transformers copy of the policy (Prefixes.policy_model)"
            )
        return _score_sequences(self.value_model, prefixes, prefixes.policy_model)


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
        count = boundary.new_real.to(hidden.device).sum(-1)
        last_index = (count - 1).clamp_min(0)
        chunk_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        self.last = torch.where((count > 0)[:, None], chunk_last, self.last)
        with self.compute.timed("value_forward"):
            self.compute.value_calls += len(boundary.responses)
            return rowwise(self.value_model.head_values, self.last).float().to(boundary.device)

    def reorder(self, index):
        super().reorder(index)
        self.model.reorder(index)
        self.last = self.last[index.to(self.last.device)]

    def score_prefixes(self, prefixes):
        return _score_sequences(self.value_model, prefixes)


class DecodedTextGuide(Guide):
    """A guide that scores the rows' text: each row is decoded with the policy's tokenizer, then
    ``score_texts(instructions, texts, compute)`` scores it."""

    needs_last_logprob = False

    def __init__(self, policy_tokenizer):
        self.policy_tokenizer = policy_tokenizer

    def score(self, boundary):
        return self._score(self.instructions, boundary.responses, self.compute).to(boundary.device)

    def score_prefixes(self, prefixes):
        return self._score(prefixes.instructions, prefixes.responses, prefixes.compute)

    def _score(self, instructions, responses, compute):
        with compute.timed("text_decode"):
            texts = self.policy_tokenizer.batch_decode(list(responses), skip_special_tokens=True)
        return self.score_texts(instructions, texts, compute)

    def score_texts(self, instructions, texts, compute):
        raise NotImplementedError

    @staticmethod
    def reencode(tokenizer, instructions, texts, system_message, compute) -> list[tuple[list[int], list[int]]]:
        """(prompt, response) ids of each row's text in another model's tokenizer and chat template."""
        with compute.timed("text_decode"):
            return [reencoded_ids(tokenizer, x, t, system_message) for x, t in zip(instructions, texts, strict=True)]


class ReencodeValueGuide(DecodedTextGuide):
    """Decode each row to text and run the value model on prompt + prefix from scratch, in the value
    model's own tokenizer and chat template (``system_message``: the policy's system turn)."""

    def __init__(self, value_model, policy_tokenizer, system_message: str | None = None):
        super().__init__(policy_tokenizer)
        self.value_model, self.system_message = value_model, system_message

    def score_texts(self, instructions, texts, compute):
        tokenizer = self.value_model.tokenizer
        inputs = [value_input_ids(*pair) for pair in self.reencode(tokenizer, instructions, texts,
                                                                   self.system_message, compute)]
        with compute.timed("value_forward"):
            values = self.value_model.score_sequences(inputs, pad_id=tokenizer.pad_token_id)
        compute.value_tokens += sum(len(i) for i in inputs)
        compute.value_calls += len(inputs)
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
            inc = IncrementalModel(model, compute, "w2s_tokens", "w2s_forward")
            hidden = inc.prefill(prompt_ids, rows_per_prompt, self.pad_id)
            self.incremental.append(inc)
            self.next_logprobs.append(torch.log_softmax(inc.logits(hidden), -1))
        self.total = torch.zeros(len(self.instructions)).to(self.incremental[0].device)

    def score(self, boundary):
        delta = torch.zeros(boundary.new_real.shape).to(self.total.device)
        for i, inc in enumerate(self.incremental):  # each model on its own device
            tokens, real = boundary.new_tokens.to(inc.device), boundary.new_real.to(inc.device)
            hidden = inc.feed(tokens, real)
            logprobs = torch.log_softmax(inc.logits(hidden), -1)
            previous = torch.cat([self.next_logprobs[i][:, None], logprobs[:, :-1]], dim=1)
            token_lp = previous.gather(-1, tokens[..., None]).squeeze(-1)
            delta += ((1 if i == 0 else -1) * token_lp * real).to(delta.device)
            count = real.sum(-1)
            last = logprobs[torch.arange(len(count), device=inc.device), (count - 1).clamp_min(0)]
            self.next_logprobs[i] = torch.where((count > 0)[:, None], last, self.next_logprobs[i])
        self.total = self.total + delta.sum(-1)
        self.compute.value_calls += len(boundary.responses)
        return self.total.to(boundary.device, copy=True)

    def reorder(self, index):
        super().reorder(index)
        for i, inc in enumerate(self.incremental):
            inc.reorder(index)
            self.next_logprobs[i] = self.next_logprobs[i][index.to(inc.device)]
        self.total = self.total[index.to(self.total.device)]

    def score_prefixes(self, prefixes):
        total = torch.zeros(len(prefixes.responses))
        for sign, model in zip((1, -1), self.models, strict=True):
            total += sign * _response_logprob_sums(model, prefixes, self.pad_id)
        prefixes.compute.value_calls += len(prefixes.responses)
        return total


class ReencodeImplicitRewardGuide(DecodedTextGuide):
    """Weak-to-strong search with a pair whose tokenizer is not the policy's (SmolLM2 beside Llama-3):
    each row is decoded, re-encoded in the pair's tokenizer and chat template, and log pi_tuned -
    log pi_untuned of its response tokens is summed from scratch (no cache)."""

    def __init__(self, tuned_model, untuned_model, pair_tokenizer, policy_tokenizer,
                 system_message: str | None = None):
        super().__init__(policy_tokenizer)
        self.models, self.pair_tokenizer, self.system_message = (tuned_model, untuned_model), pair_tokenizer, system_message

    def score_texts(self, instructions, texts, compute):
        encoded = self.reencode(self.pair_tokenizer, instructions, texts, self.system_message, compute)
        rows = Prefixes(list(instructions), [p for p, _ in encoded], [r for _, r in encoded], compute,
                        self.pair_tokenizer.pad_token_id)
        total = torch.zeros(len(encoded))
        for sign, model in zip((1, -1), self.models, strict=True):
            total += sign * _response_logprob_sums(model, rows, rows.pad_id)
        compute.value_calls += len(encoded)
        return total


@torch.no_grad()
def _response_logprob_sums(model, prefixes: Prefixes, pad_id: int) -> torch.Tensor:
    """sum over each row's response tokens of log model(token | prompt, earlier tokens), from scratch."""
    from spi.value_batches import pad_right

    sequences = prefixes.sequences()
    ids, mask = pad_right(sequences, pad_id)
    device = next(model.parameters()).device
    with prefixes.compute.timed("w2s_forward"):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float().cpu()
    token_lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    starts = torch.tensor([len(p) for p in prefixes.prompt_ids])
    positions = torch.arange(1, ids.shape[1])[None, :]  # position of each predicted token
    in_response = (positions >= starts[:, None]) & mask[:, 1:].bool()
    prefixes.compute.w2s_tokens += int(mask.sum())
    return (token_lp * in_response).sum(-1)


class RewardGuide(DecodedTextGuide):
    """r(x, prefix) from a reward model on the decoded prefix (ARGS's per-token reward)."""

    def __init__(self, reward_model, policy_tokenizer):
        super().__init__(policy_tokenizer)
        self.reward_model = reward_model

    def score_texts(self, instructions, texts, compute):
        return torch.tensor(charge_reward(self.reward_model, instructions, texts, compute), dtype=torch.float32)


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

    @property
    def needs_hidden_mean(self):
        return any(getattr(guide, "needs_hidden_mean", False) for guide, _ in self.parts)

    def begin(self, instructions, prompt_ids, rows_per_prompt, compute):
        for guide, _ in self.parts:
            guide.begin(instructions, prompt_ids, rows_per_prompt, compute)

    def score(self, boundary):
        return sum(weight * guide.score(boundary) for guide, weight in self.parts)

    def reorder(self, index):
        for guide, _ in self.parts:
            guide.reorder(index)

    def score_prefixes(self, prefixes):
        return sum(weight * guide.score_prefixes(prefixes) for guide, weight in self.parts)
