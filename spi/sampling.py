"""Token choice from logits with row-owned randomness.

Every row draws its token from a uniform number that belongs to that row (see ``row_uniforms``), by
inverting the cumulative distribution of the temperature/top-k/top-p filtered probabilities. A row's
tokens therefore do not depend on which other rows share its batch, and two routines that give a row
the same uniforms sample the same tokens.

Devices: the uniforms are drawn by a CPU generator seeded per row (a pure function of the seed, the
same numbers whatever device decodes) and moved once per batch to the device of the logits; nothing of
the draw itself touches a device RNG, so a row samples the same tokens on any device up to the logits'
floats.

Speed: top-p is applied inside the top ``candidates`` logits rather than over the whole vocabulary
(a full sort of a 49k vocabulary per row dominated decoding). When those candidates hold less than the
top-p mass (only possible with top-k disabled), the row falls back to the full sort, so the
distribution is always exact.
"""

from __future__ import annotations

import torch

PREFILTER = 256


def row_uniforms(seed: int, rows: int, steps: int) -> torch.Tensor:
    """Uniform numbers for ``rows`` rows x ``steps`` tokens, a pure function of ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, steps, generator=generator, dtype=torch.float64)


def _top_p_kept(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Descending probabilities with those past the top-p cut zeroed (the most likely one always kept)."""
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep[:, 0] = True
    return sorted_probs * keep


def _pick(sorted_probs: torch.Tensor, sorted_ids: torch.Tensor, top_p: float, u: torch.Tensor):
    """Inverse-CDF draw from descending probabilities after a top-p cut; returns token ids."""
    cdf = _top_p_kept(sorted_probs, top_p).cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).clamp_max(cdf.shape[-1] - 1)
    return sorted_ids.gather(-1, index).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Sample one token per row of ``logits`` [rows, vocab] using the row's uniform ``u`` [rows]."""
    if temperature == 0:
        return logits.argmax(-1)
    u = u.to(logits.device)
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    width = min(top_k if top_k > 0 else PREFILTER, vocab)
    top_logits, top_ids = scaled.topk(width, dim=-1)
    if top_k > 0:
        probs = torch.softmax(top_logits, dim=-1)
        return _pick(probs, top_ids, top_p, u)
    probs = torch.exp(top_logits - torch.logsumexp(scaled, dim=-1, keepdim=True))
    tokens = _pick(probs, top_ids, top_p, u)
    short = probs.sum(-1) < top_p
    if short.any():
        full_probs, full_ids = torch.softmax(scaled[short], dim=-1).sort(dim=-1, descending=True)
        tokens[short] = _pick(full_probs, full_ids, top_p, u[short])
    return tokens


def warped_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int,
                   top_p: float) -> torch.Tensor:
    """log p(token) per row under the distribution :func:`sample_tokens` draws from (temperature, top-k,
    then the top-p cut, renormalised); -inf for a token outside the kept set. ARGS's sampled proposals
    are scored with it (IRO: log p_warped)."""
    if temperature == 0:
        return torch.where(tokens == logits.argmax(-1), 0.0, float("-inf"))
    scaled = logits.float() / temperature
    width = min(top_k, scaled.shape[-1]) if top_k > 0 else scaled.shape[-1]
    top_logits, top_ids = scaled.topk(width, dim=-1)
    kept = _top_p_kept(torch.softmax(top_logits, dim=-1), top_p)
    chosen = (kept * (top_ids == tokens[:, None])).sum(-1)
    return torch.log(chosen / kept.sum(-1))


def topk_candidates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k most likely tokens of each row, most likely first: ARGS's deterministic proposals."""
    return logits.topk(k, dim=-1).indices
