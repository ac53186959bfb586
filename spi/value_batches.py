"""Padded batches of value-model inputs, shared by the value fit, its trainer and the guides.

    pad_right       right-padded ids and attention mask of token sequences
    response_mask   1 at the positions a value is read and trained: the last prompt token .. the last
                    response token, V(x, y_<t) for t in 0..|y|
    batch_tensors   (ids, mask, positions, targets) of value examples on a device
    input_tokens    how many real tokens ``batch_tensors`` gives the model for some examples
"""

from __future__ import annotations

import torch

from spi.prompts import value_input_ids


def pad_right(sequences: list[list[int]], pad_id: int):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return ids, mask


def response_mask(examples, width: int) -> torch.Tensor:
    """1 at positions t = last prompt token .. last response token: V(x, y_<t) for t in 0..|y|."""
    mask = torch.zeros(len(examples), width)
    for i, ex in enumerate(examples):
        start = len(ex.prompt_ids) - 1
        mask[i, start:len(ex.prompt_ids) + len(ex.response_ids)] = 1
    return mask


def batch_tensors(examples, pad_id: int, device, max_length: int | None = None):
    """(ids, mask, positions, targets) of ``examples`` on ``device``; sequences cut at ``max_length``.
    ``positions`` marks t = last prompt token .. last response token: V(x, y_<t) for t in 0..|y|."""
    sequences = [value_input_ids(e.prompt_ids, e.response_ids)[:max_length] for e in examples]
    ids, mask = pad_right(sequences, pad_id)
    positions = response_mask(examples, ids.shape[1])
    targets = torch.tensor([e.reward for e in examples])
    return ids.to(device), mask.to(device), positions.to(device), targets.to(device)


def input_tokens(examples, max_length: int | None = None) -> int:
    """Real (unpadded) tokens of ``examples``' value inputs cut at ``max_length``: what one forward reads."""
    return sum(len(value_input_ids(e.prompt_ids, e.response_ids)[:max_length]) for e in examples)
