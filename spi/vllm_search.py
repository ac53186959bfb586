"""Chunk-level beam search (CBS) on a vLLM engine: the ``vllm`` generation backend.

The same settings and result as ``spi.search.search``, computed through vLLM's offline API only
(``LLM.generate(prompts, sampling_params)`` on ``{"prompt_token_ids": ...}`` prompts, i.e. vLLM's
``TokensPrompt``). Each prompt starts W*K rows from its chat prompt; every chunk submits each live row
as prompt + its response so far (the engine's prefix cache serves the repeated prefixes) for up to L
more tokens; at a chunk boundary the guide scores every row from its tokens (``Guide.score_prefixes``),
``spi.search._select`` keeps W rows per prompt and each is tiled K times. Rows stop at the policy's
EOS ids. The final pick is the reward model's (``final_pick == "reward"`` and rows > 1) or the guide's.

Randomness: one request with n=1 per row, seeded by (prompt seed, chunk, row). A row's tokens then
depend on its own seed only (vLLM's n>1 seeding differs between engine versions). They do NOT match
``spi.sampling``'s tokens for the same seed, and vLLM's batched GPU kernels are not bit-reproducible.

Not supported here: ``proposal='topk'`` (ARGS) and guides without ``score_prefixes``.
"""

from __future__ import annotations

import hashlib

import torch

from spi.compute import Compute
from spi.guides import Guide, Prefixes, WeightedGuide
from spi.search import SearchOutput, SearchSettings, _select, _strip_eos, pick_answers


def search(engine, policy, instructions: list[str], seeds: list[int], settings: SearchSettings,
           guide: Guide | None = None, reward_model=None, progress: bool = False,
           sampling_params=None) -> SearchOutput:
    """``spi.search.search`` on ``engine`` (a ``vllm.LLM``); ``policy`` gives the tokenizer, the EOS ids and
    (for guides reading the policy's hidden states) a transformers copy of the same weights.
    ``sampling_params``: the SamplingParams class (default ``vllm.SamplingParams``)."""
    if len(seeds) != len(instructions):
        raise ValueError(f"{len(instructions)} instructions but {len(seeds)} seeds")
    if settings.proposal != "sample":
        raise ValueError(f"proposal='{settings.proposal}' (ARGS's top-k proposals) is not supported on vLLM")
    unsupported = [type(g).__name__ for g in _leaf_guides(guide) if type(g).score_prefixes is Guide.score_prefixes]
    if unsupported:
        raise ValueError(f"guide {', '.join(unsupported)} cannot score token prefixes, so it cannot steer the "
                         "vLLM backend; use execution.backend 'transformers' for this system")
    if sampling_params is None:
        from vllm import SamplingParams as sampling_params
    output = SearchOutput([])
    for start in range(0, len(instructions), settings.batch_prompts):
        part = slice(start, start + settings.batch_prompts)
        output.results += _search_batch(engine, sampling_params, policy, instructions[part], seeds[part],
                                        settings, guide, reward_model, output.compute)
    return output


def _leaf_guides(guide):
    if isinstance(guide, WeightedGuide):
        return [g for part, _ in guide.parts for g in _leaf_guides(part)]
    return [] if guide is None else [guide]


def row_seed(prompt_seed: int, chunk: int, row: int) -> int:
    """The vLLM request seed of a row's chunk: a pure function of (prompt seed, chunk, row)."""
    digest = hashlib.sha256(f"{prompt_seed}/{chunk}/{row}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _search_batch(engine, sampling_params, policy, instructions, seeds, settings, guide, reward_model,
                  compute: Compute):
    tokenizer, eos, rows, limit = policy.tokenizer, policy.eos_ids, settings.rows, settings.max_new_tokens
    prompts = [policy.prompt_ids(x) for x in instructions]
    selects = settings.successors > 1 and settings.chunk_length is not None and guide is not None
    chunk = settings.chunk_length if selects else limit
    # responses[p][r]: row r's tokens (EOS kept while searching); ended[p][r]: it will get no more
    responses = [[[] for _ in range(rows)] for _ in prompts]
    ended = [[False] * rows for _ in prompts]
    boundaries, changes = [0] * len(prompts), [0] * len(prompts)

    def prefixes(ps):
        return Prefixes([instructions[p] for p in ps for _ in range(rows)],
                        [prompts[p] for p in ps for _ in range(rows)],
                        [responses[p][r] for p in ps for r in range(rows)], compute,
                        tokenizer.pad_token_id, getattr(policy, "model", None))

    for c in range(-(-limit // chunk)):
        live = [(p, r) for p in range(len(prompts)) for r in range(rows) if not ended[p][r]]
        if not live:
            break
        budget = min(chunk, limit - c * chunk)
        requests = [{"prompt_token_ids": prompts[p] + responses[p][r]} for p, r in live]
        params = [sampling_params(n=1, max_tokens=budget, temperature=settings.temperature,
                                  top_p=settings.top_p, top_k=settings.top_k if settings.top_k > 0 else -1,
                                  seed=row_seed(seeds[p], c, r), ignore_eos=settings.ignore_eos,
                                  stop_token_ids=None if settings.ignore_eos else list(eos))
                  for p, r in live]
        with compute.timed("vllm_generate"):
            outputs = engine.generate(requests, params, use_tqdm=False)
        for (p, r), request, out in zip(live, requests, outputs, strict=True):
            new = list(out.outputs[0].token_ids)
            responses[p][r] = responses[p][r] + new
            stopped = not settings.ignore_eos and (getattr(out.outputs[0], "finish_reason", None) == "stop"
                                                   or (bool(new) and new[-1] in eos))
            ended[p][r] = stopped or len(new) < budget or len(responses[p][r]) >= limit
            compute.generated_tokens += len(new)
            compute.policy_tokens += len(request["prompt_token_ids"]) + len(new)  # prefix-cache hits included
        searching = [p for p in range(len(prompts)) if not all(ended[p])]
        if not selects or not searching:
            continue
        scores = guide.score_prefixes(prefixes(searching))
        with compute.timed("selection"):
            for i, p in enumerate(searching):
                keys = [tuple(x) for x in responses[p]]
                index, changed = _select(scores[i * rows:(i + 1) * rows], keys, 1, settings, [seeds[p]],
                                         (c + 1) * chunk - 1)
                responses[p] = [responses[p][j] for j in index.tolist()]
                ended[p] = [ended[p][j] for j in index.tolist()]
                boundaries[p] += 1
                changes[p] += int(changed[0])

    everyone = list(range(len(prompts)))
    if guide is not None:
        values = guide.score_prefixes(prefixes(everyone))
    else:
        values = torch.full((len(prompts) * rows,), float("nan"))
    with compute.timed("text_decode"):
        response_ids = [_strip_eos(ids, eos) for group in responses for ids in group]
        texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return pick_answers(instructions, texts, response_ids, values, settings, guide, reward_model, compute,
                        boundaries, changes)
