"""Chunk-level beam search (CBS): the one decoding routine of the project.

Each prompt gets W*K rows sharing one prefill. Rows sample L tokens from pi_0 with the KV cache; at the
chunk boundary a guide scores every row, W rows per prompt are kept and each is tiled K times (the
cache reordered to match), until every row has ended. The answer is the leaf with the highest reward
(IRO's final pick) or, without a reward model, the highest guide score.

Special cases are settings, not code: plain sampling is (W=1, K=1); Best-of-N is (W=1, K=N, L=None,
final pick by reward); blockwise controlled decoding is (W=1, K, L); ARGS is (W=1, K=k, L=1) with the
guide log p + w * r, its k proposals the top-k tokens (proposal="topk") or k samples (IRO's code).

Results do not depend on batch composition, bit for bit in float32: prompts share a batch only with prompts
of the same padded width (``spi.incremental.padded_width``) and row counts are padded to whole blocks of
the matrix-multiply kernel, so every row computes the same floats alone or in a batch of any size/order.

Devices: the search state (tokens, lengths, masks, uniforms) lives on the policy's device; guides score
on their own models' devices and return scores on the policy's. Selection itself runs on the CPU (a few
numbers per row, read once per boundary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from spi.compute import Compute, charge_reward
from spi.guides import Boundary, Guide
from spi.incremental import IncrementalModel, padded_width
from spi.models import model_max_length
from spi.sampling import row_uniforms, sample_tokens, topk_candidates, warped_logprob


@dataclass(frozen=True)
class SearchSettings:
    width: int = 1  # W
    successors: int = 1  # K
    chunk_length: int | None = None  # L; None = one chunk for the whole response
    temperature: float = 0.6  # 0 = greedy
    top_k: int = 50
    top_p: float = 0.9
    max_new_tokens: int = 128
    selection: str = "diverse"  # or "stochastic"
    selection_temperature: float = 1.0
    proposal: str = "sample"  # or "topk" (ARGS)
    final_pick: str = "reward"  # or "value"
    batch_prompts: int = 8
    ignore_eos: bool = False  # mask EOS logits so every row runs max_new_tokens (fixed length, for benchmarks)

    @property
    def rows(self) -> int:
        return self.width * self.successors


@dataclass
class SearchResult:
    instruction: str
    responses: list[str]  # the W*K leaves
    response_ids: list[list[int]]
    leaf_values: list[float]  # guide score of each leaf (nan without a guide)
    leaf_rewards: list[float] | None  # final reward of each leaf, when a reward model picked
    chosen: int
    boundaries: int = 0  # chunk boundaries where selection ran
    beam_changes: int = 0  # boundaries where the best-scored beam was not the first-sampled row

    @property
    def answer(self) -> str:
        return self.responses[self.chosen]


@dataclass
class SearchOutput:
    results: list[SearchResult]
    compute: Compute = field(default_factory=Compute)


@torch.inference_mode()
def search(policy, instructions: list[str], seeds: list[int], settings: SearchSettings,
           guide: Guide | None = None, reward_model=None, progress: bool = True) -> SearchOutput:
    """Decode every instruction (batched ``settings.batch_prompts`` at a time); ``seeds[i]`` owns row randomness."""
    if len(seeds) != len(instructions):
        raise ValueError(f"{len(instructions)} instructions but {len(seeds)} seeds")
    if settings.proposal == "topk" and settings.width != 1:
        raise ValueError("proposal='topk' (ARGS) needs width=1")
    output = SearchOutput([])
    results: list[SearchResult | None] = [None] * len(instructions)
    prompts = [policy.prompt_ids(x) for x in instructions]  # encoded once: batching and decoding read them
    bar = tqdm(total=len(instructions), desc="decode", unit="prompt", disable=not progress, leave=False)
    for batch in _batches(prompts, settings.batch_prompts):
        batch_results = _search_batch(policy, [instructions[i] for i in batch], [prompts[i] for i in batch],
                                      [seeds[i] for i in batch], settings, guide, reward_model, output.compute)
        for i, result in zip(batch, batch_results, strict=True):
            results[i] = result
        bar.update(len(batch))
    bar.close()
    output.results = results
    return output


def _batches(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Indices of prompts decoded together: only prompts of equal padded width share a batch (so a
    prompt's results do not depend on its batch), in input order within a width, at most ``size`` each."""
    by_width: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_width.setdefault(padded_width(len(prompt)), []).append(i)
    return [group[s:s + size] for group in by_width.values() for s in range(0, len(group), size)]


def _proposal_logprob(logits, chosen, settings):
    """log pi of a top-k proposal; log of the warped distribution a sampled proposal was drawn from."""
    if settings.proposal == "topk":
        return torch.log_softmax(logits.float(), -1).gather(-1, chosen[:, None]).squeeze(-1)
    return warped_logprob(logits, chosen, settings.temperature, settings.top_k, settings.top_p)


def _select(scores, responses, prompts, settings, seeds, boundary_no, finished=None):
    """Row indices after selection: W kept rows per prompt, each repeated K times. A prompt whose rows
    have all ended keeps them as they are (its ``changed`` entry is None): had it been decoded alone, its
    search would have stopped, so selecting again would make its leaves depend on its batch."""
    rows, width, k = settings.rows, settings.width, settings.successors
    index, changed = [], []
    for p in range(prompts):
        group = list(range(p * rows, (p + 1) * rows))
        if finished is not None and bool(finished[p * rows:(p + 1) * rows].all()):
            index += group
            changed.append(None)
            continue
        group_scores = scores[p * rows:(p + 1) * rows].cpu()
        if settings.selection == "stochastic":
            generator = torch.Generator().manual_seed(seeds[p] * 1_000_003 + boundary_no)
            gumbel = -torch.log(-torch.log(torch.rand(rows, generator=generator, dtype=torch.float64)))
            order = torch.argsort(group_scores.double() / settings.selection_temperature + gumbel, descending=True, stable=True)
            kept = [group[i] for i in order[:width].tolist()]
        else:
            order = torch.argsort(group_scores, descending=True, stable=True).tolist()
            seen, distinct, repeats = set(), [], []
            for i in order:
                key = tuple(responses[group[i]])  # rows arrive as tuples: tuple() is then a no-op
                (repeats if key in seen else distinct).append(group[i])
                seen.add(key)
            kept = (distinct + repeats)[:width]
        changed.append(kept[0] != group[0])
        index += [row for row in kept for _ in range(k)]
    return torch.tensor(index), changed


def _search_batch(policy, instructions, prompts, seeds, settings, guide, reward_model, compute):
    tokenizer, model = policy.tokenizer, policy.model
    rows, steps = settings.rows, settings.max_new_tokens
    limit = model_max_length(model)
    if limit and max(len(p) for p in prompts) + steps > limit:
        raise ValueError(f"sampling.max_new_tokens ({steps}) + the longest prompt ({max(len(p) for p in prompts)} "
                         f"tokens) exceed the {limit} positions of the policy '{policy.name}' (its config)")
    n = len(prompts) * rows
    pad = tokenizer.pad_token_id
    incremental = IncrementalModel(model, compute, "policy_tokens", "policy_forward")
    device = incremental.device
    eos = torch.tensor(policy.eos_ids).to(device)
    uniforms = torch.cat([row_uniforms(seed, rows, steps) for seed in seeds]).to(device)
    hidden = incremental.prefill(prompts, rows, pad)
    logits = incremental.logits(hidden)
    if guide is not None:
        guide.begin(instructions, prompts, rows, compute)

    tokens = torch.full((n, steps), pad, dtype=torch.long, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    last_hidden, last_logprob = hidden, torch.zeros(n, device=device)
    # running sum of each row's hidden states from the last prompt token on, kept only for guides that
    # read their mean ("last+mean" value heads)
    tracks_mean = guide is not None and getattr(guide, "needs_hidden_mean", False)
    hidden_sum, hidden_count = (hidden.float(), torch.ones(n).to(device)) if tracks_mean else (None, None)
    scored_upto = 0  # response position up to which the guide has seen tokens
    kept_scores = None  # the guide's scores of the rows kept at the last boundary
    boundaries = [0] * len(prompts)
    changes = [0] * len(prompts)
    selects = settings.successors > 1 and settings.chunk_length is not None and guide is not None
    needs_logprob = guide is not None and getattr(guide, "needs_last_logprob", True)

    def boundary(t):
        nonlocal scored_upto
        new = tokens[:, scored_upto:t + 1]
        position = torch.arange(scored_upto, t + 1, device=device)[None, :]
        scored_upto = t + 1
        # built only if a guide reads them (text-based guides); cache-based guides never do
        mean = hidden_sum / hidden_count[:, None] if tracks_mean else None
        return Boundary(new, position < lengths[:, None], LazyResponses(tokens, lengths), last_hidden, mean, last_logprob)

    for t in range(steps):
        active = ~finished
        with compute.timed("sampling"):
            if settings.ignore_eos:
                logits[:, eos] = float("-inf")
            if settings.proposal == "topk":
                slot = torch.arange(n, device=device) % settings.successors
                chosen = topk_candidates(logits, settings.successors).gather(-1, slot[:, None]).squeeze(-1)
            else:
                chosen = sample_tokens(logits, uniforms[:, t], settings.temperature, settings.top_k, settings.top_p)
            chosen = torch.where(active, chosen, pad)
            if needs_logprob:  # only ARGS's TokenLogProbGuide reads it: skip a full-vocabulary log_softmax
                last_logprob = torch.where(active, _proposal_logprob(logits, chosen, settings), last_logprob)
        tokens[:, t] = chosen
        lengths += active.long()
        compute.generated_tokens += int(active.sum())
        finished |= active & torch.isin(chosen, eos)
        done = bool(finished.all()) or t == steps - 1
        if done and guide is None:
            break
        hidden = incremental.feed(chosen[:, None], active[:, None])[:, -1]
        last_hidden = torch.where(active[:, None], hidden, last_hidden)
        if tracks_mean:
            hidden_sum += torch.where(active[:, None], hidden, 0).float()
            hidden_count += active.float()
        if done:
            break
        logits = incremental.logits(hidden)
        if selects and (t + 1) % settings.chunk_length == 0:
            scores = guide.score(boundary(t))
            with compute.timed("selection"):
                keys = _row_keys(tokens, lengths) if settings.selection == "diverse" else None
                index, changed = _select(scores, keys, len(prompts), settings, seeds, t, finished)
                index = index.to(device)
            for p, was_changed in enumerate(changed):
                if was_changed is not None:
                    boundaries[p] += 1
                    changes[p] += int(was_changed)
            kept_scores = scores[index]
            incremental.reorder(index)
            guide.reorder(index)
            tokens, lengths, finished = tokens[index], lengths[index], finished[index]
            last_hidden, last_logprob, logits = last_hidden[index], last_logprob[index], logits[index]
            if tracks_mean:
                hidden_sum, hidden_count = hidden_sum[index], hidden_count[index]

    if guide is None:
        values = torch.full((n,), float("nan"))
    elif int(lengths.max()) > scored_upto:
        values = guide.score(boundary(int(lengths.max()) - 1))
    else:  # every kept row ended before the last boundary: it already scored them all
        values = kept_scores
    with compute.timed("text_decode"):
        response_ids = [_strip_eos(list(row), policy.eos_ids) for row in _row_keys(tokens, lengths)]
        texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return pick_answers(instructions, texts, response_ids, values, settings, guide, reward_model, compute,
                        boundaries, changes)


def pick_answers(instructions, texts, response_ids, values, settings, guide, reward_model, compute,
                 boundaries, changes) -> list[SearchResult]:
    """Each prompt's answer among its W*K leaves (flat, prompt-major lists): the highest reward when the
    reward model picks, else the highest guide value, else the first row (ties: the first)."""
    rows = settings.rows
    rewards = None
    if reward_model is not None and settings.final_pick == "reward" and rows > 1:
        rewards = charge_reward(reward_model, [x for x in instructions for _ in range(rows)], texts, compute)
    results = []
    for p, instruction in enumerate(instructions):
        group = slice(p * rows, (p + 1) * rows)
        group_values = values[group].tolist()
        if rewards is not None:
            pick = max(range(rows), key=lambda i: (rewards[group][i], -i))
        elif guide is not None:
            pick = max(range(rows), key=lambda i: (group_values[i], -i))
        else:
            pick = 0
        results.append(SearchResult(instruction, texts[group], response_ids[group], group_values,
                                    rewards[group] if rewards is not None else None, pick,
                                    boundaries[p], changes[p]))
    return results


def _row_keys(tokens: torch.Tensor, lengths: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row's response as a hashable tuple (one tolist for the whole batch, not one per row)."""
    width = int(lengths.max()) if len(lengths) else 0
    return [tuple(row[:length]) for row, length in zip(tokens[:, :width].tolist(), lengths.tolist(), strict=True)]


class LazyResponses(Sequence):
    """Rows' response token lists, materialised on first access (one tolist for all rows)."""

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor):
        self._tokens, self._lengths, self._rows = tokens, lengths, None

    def _materialise(self) -> list[list[int]]:
        if self._rows is None:
            width = int(self._lengths.max()) if len(self._lengths) else 0
            self._rows = [row[:length] for row, length in
                          zip(self._tokens[:, :width].tolist(), self._lengths.tolist(), strict=True)]
        return self._rows

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i):
        return self._materialise()[i]

    def __iter__(self):
        return iter(self._materialise())

    def __eq__(self, other):
        return list(self) == list(other)


def _strip_eos(ids: list[int], eos_ids: list[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos_ids else ids
