"""A transformer fed incrementally through its own KV cache, reorderable for beam search.

The policy, a separate value backbone and the two models of weak-to-strong search all use this one
class: prefill the prompts once (left-padded), repeat each prompt's cache for its rows, feed new
tokens as they are chosen, and reorder rows with the search's selection.
Everything it keeps (cache, mask, positions) lives on the model's device; tokens and row indices
arriving from another device are moved there.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from spi.compute import Compute

# Prompts are left-padded to a multiple of PAD_MULTIPLE with at least one padding column, so a prompt's
# layout in the cache (and hence every float it produces) depends only on its own length, not on the other
# prompts of its batch: the search batches prompts of equal ``padded_width`` together. (Left padding by a
# different amount, or no padding at all, changes float32 logits by ~1e-5 on CPU, enough to flip a sample.)
PAD_MULTIPLE = 64


def padded_width(length: int) -> int:
    """Cache width of a prompt of ``length`` tokens: the next multiple of PAD_MULTIPLE above it."""
    return (length // PAD_MULTIPLE + 1) * PAD_MULTIPLE


# MKL computes the rows of a matrix product differently when they fall outside a full block of 4 rows (a
# lone row, or the 1-3 rows left over), which again changes float32 results with the batch. Row counts are
# therefore padded to a multiple of ROW_BLOCK: spare rows in the cache, zero rows for heads.
ROW_BLOCK = 4


def rowwise(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to the rows of ``x`` [..., H] with the row count padded to a multiple of ROW_BLOCK, so
    each row's result does not depend on how many rows came with it."""
    flat = x.reshape(-1, x.shape[-1])
    spare = (-flat.shape[0]) % ROW_BLOCK
    if spare:
        flat = torch.cat([flat, flat.new_zeros(spare, flat.shape[-1])])
    out = fn(flat)
    if spare:
        out = out[:-spare]
    return out.reshape(*x.shape[:-1], *out.shape[1:])


class IncrementalModel:
    def __init__(self, model, compute: Compute, counter: str, part: str):
        has_head = model.get_output_embeddings() is not None
        self.decoder = model.get_decoder() if has_head else model
        self.lm_head = model.get_output_embeddings() if has_head else None
        self.compute, self.counter, self.part = compute, counter, part
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask = None
        self.next_position = None

    def _forward(self, input_ids, attention_mask, position_ids, counted_rows=None) -> torch.Tensor:
        with self.compute.timed(self.part):
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=self.cache, use_cache=True)
        new = attention_mask[:counted_rows, -input_ids.shape[1]:]
        setattr(self.compute, self.counter, getattr(self.compute, self.counter) + int(new.sum()))
        return out.last_hidden_state

    def prefill(self, prompts: list[list[int]], repeat: int, pad_id: int) -> torch.Tensor:
        """Run the prompts once; return the last hidden state of each of the len(prompts)*repeat rows."""
        width = max(padded_width(len(p)) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        self.cache = DynamicCache()
        hidden = self._forward(ids, mask, positions)[:, -1]
        self.rows = len(prompts) * repeat
        self.spare = (-self.rows) % ROW_BLOCK  # copies of the last row, dropped from every output
        with self.compute.timed("cache_reorder"):
            self.cache.batch_repeat_interleave(repeat)
            if self.spare:
                self.cache.reorder_cache(self._with_spare(self._arange(self.rows)))
        self.mask = mask.repeat_interleave(repeat, dim=0)
        self.next_position = mask.sum(-1).repeat_interleave(repeat)
        if self.spare:
            self.mask = self.mask[self._with_spare(self._arange(self.rows))]
            self.next_position = self.next_position[self._with_spare(self._arange(self.rows))]
        return hidden.repeat_interleave(repeat, dim=0)

    def _arange(self, *bounds) -> torch.Tensor:
        return torch.arange(*bounds, device=self.device)

    def _with_spare(self, index: torch.Tensor) -> torch.Tensor:
        """A row index over the real rows, extended to the spare rows (which copy the last real row)."""
        if not self.spare:
            return index
        return torch.cat([index, index[-1:].expand(self.spare)])

    def feed(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [rows, n] (``real`` marks which are not padding); return hidden [rows, n, H]."""
        tokens, real = tokens.to(self.device), real.to(self.device)
        if self.spare:
            every = self._with_spare(self._arange(self.rows))
            tokens, real = tokens[every], real[every]
        real = real.long()
        positions = self.next_position[:, None] + (real.cumsum(-1) - 1).clamp_min(0)
        self.mask = torch.cat([self.mask, real], dim=-1)
        hidden = self._forward(tokens, self.mask, positions, counted_rows=self.rows)
        self.next_position = self.next_position + real.sum(-1)
        return hidden[:self.rows]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.compute.timed(self.part):
            return rowwise(self.lm_head, hidden).float()

    def reorder(self, index: torch.Tensor) -> None:
        with self.compute.timed("cache_reorder"):
            index = index.to(self.device)
            every = torch.cat([index, self._arange(self.rows, self.rows + self.spare)]) if self.spare else index
            self.cache.reorder_cache(every)
            self.mask = self.mask[every]
            self.next_position = self.next_position[every]
