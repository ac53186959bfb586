"""A transformer fed incrementally through its own KV cache, reorderable for beam search.

The policy, a separate value backbone and the two models of weak-to-strong search all use this one
class: prefill the prompts once (left-padded), repeat each prompt's cache for its rows, feed new
tokens as they are chosen, and reorder rows with the search's selection.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from spi.compute import Compute


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

    def _forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        with self.compute.timed(self.part):
            out = self.decoder(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                position_ids=position_ids.to(self.device), cache=self.cache, use_cache=True,
            )
        setattr(self.compute, self.counter, getattr(self.compute, self.counter) + int(attention_mask[:, -input_ids.shape[1]:].sum()))
        return out.last_hidden_state

    def prefill(self, prompts: list[list[int]], repeat: int, pad_id: int) -> torch.Tensor:
        """Run the prompts once; return the last hidden state of each of the len(prompts)*repeat rows."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        self.cache = DynamicCache()
        hidden = self._forward(ids, mask, positions)[:, -1]
        with self.compute.timed("cache_reorder"):
            self.cache.batch_repeat_interleave(repeat)
        self.mask = mask.repeat_interleave(repeat, dim=0)
        self.next_position = mask.sum(-1).repeat_interleave(repeat)
        return hidden.repeat_interleave(repeat, dim=0)

    def feed(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [rows, n] (``real`` marks which are not padding); return hidden [rows, n, H]."""
        real = real.long()
        positions = self.next_position[:, None] + (real.cumsum(-1) - 1).clamp_min(0)
        self.mask = torch.cat([self.mask, real], dim=-1)
        hidden = self._forward(tokens, self.mask, positions)
        self.next_position = self.next_position + real.sum(-1)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.compute.timed(self.part):
            return self.lm_head(hidden).float()

    def reorder(self, index: torch.Tensor) -> None:
        with self.compute.timed("cache_reorder"):
            self.cache.reorder_cache(index.to(self.device))
            self.mask = self.mask[index]
            self.next_position = self.next_position[index]
