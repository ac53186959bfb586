"""Gradient training of a backbone value model, at the scale of an 8B backbone.

- Master weights in float32: a bfloat16 backbone is trained as float32 parameters under bfloat16
  autocast (``master_dtype="float32"``), so that updates of lr 3e-6 are not rounded away; after the fit
  the backbone returns to the dtype it was loaded in (``value.dtype``: float32 keeps every update).
- Micro-batches with gradient accumulation: ``batch_size`` is the effective batch of one optimizer
  step, over all processes; each process runs ``batch_size / processes`` examples of it in
  micro-batches of ``micro_batch_size`` (IRO: 1 x 64 x 4 GPUs).
- Gradient checkpointing of the backbone as a setting.
- Data-parallel (and sharded) training through an ``accelerate.Accelerator`` (DDP or FSDP), which
  ``spi.value_fit_distributed`` creates in each process. Every process reads the same step order and
  takes its own contiguous share of each step; losses are normalised by the positions of the whole
  step, so N processes give the gradient of one process over the same effective batch (a test pins it).
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from spi.value_batches import batch_tensors

MASTER_DTYPES = ("float32", "model")


@dataclass(frozen=True)
class TrainSettings:
    micro_batch_size: int | None = None  # examples per forward/backward on one process; None = its whole share
    gradient_checkpointing: bool = False
    master_dtype: str = "float32"  # "float32": float32 parameters under autocast; "model": the loaded dtype
    max_length: int | None = None  # value-input tokens kept per example; None = the model config's limit
    accelerator: object | None = None  # an accelerate.Accelerator for data-parallel training




def counted_positions(example, max_length: int | None) -> int:
    """How many positions of ``example`` the loss reads (``batch_tensors``' positions)."""
    start = len(example.prompt_ids) - 1
    end = len(example.prompt_ids) + len(example.response_ids)
    return max(0, min(end, max_length or end) - start)


def micro_size(batch_size: int, micro_batch_size: int | None, processes: int) -> int:
    """The micro-batch, checked against the effective batch: batch = micro x accumulation x processes."""
    share = math.ceil(batch_size / processes)
    micro = micro_batch_size or share
    if batch_size % processes or share % micro:
        raise ValueError(
            f"value.batch_size ({batch_size}) must be a multiple of value.micro_batch_size ({micro}) x "
            f"value.processes ({processes}): effective batch = micro-batch x accumulation x processes"
        )
    return micro


def train_backbone(model, train, pad_id: int, *, epochs: int, learning_rate: float, batch_size: int,
                   weight_decay: float, seed: int, progress, settings: TrainSettings) -> tuple[float, int, int]:
    """AdamW with a cosine schedule over ``epochs``; returns the last epoch's loss and the real tokens
    forwarded and backwarded through the model, all processes together."""
    if settings.master_dtype not in MASTER_DTYPES:
        raise ValueError(f"value.master_dtype must be one of {', '.join(MASTER_DTYPES)}, not {settings.master_dtype!r}")
    accelerator = settings.accelerator
    processes = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    micro = micro_size(batch_size, settings.micro_batch_size, processes)
    device = accelerator.device if accelerator else model.head.weight.device
    loaded_dtype = next(model.backbone.parameters()).dtype
    # every process computes the statistics of the same first step
    forwarded = processes * _initialise(model, train[:batch_size], pad_id, micro, settings.max_length,
                                        sum(e.reward for e in train) / len(train))
    trained = 0
    if settings.master_dtype == "float32":
        model.float()
    mixed = settings.master_dtype == "float32" and loaded_dtype != torch.float32
    autocast = torch.autocast(device.type, dtype=loaded_dtype) if mixed else nullcontext()
    if settings.gradient_checkpointing:
        model.backbone.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    wrapped = accelerator.prepare(model) if accelerator else model
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=weight_decay)
    if accelerator:
        optimizer = accelerator.prepare(optimizer)
    steps = epochs * math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    loss_value = float("nan")
    for epoch in range(epochs):
        order = list(range(len(train)))
        random.Random(seed + epoch).shuffle(order)
        total = torch.zeros(3, dtype=torch.float64, device=device)  # sum of squared errors / 2, positions, tokens
        for s in range(0, len(order), batch_size):
            step = [train[i] for i in order[s:s + batch_size]]
            total += _step(wrapped, step, rank, processes, micro, pad_id, device, settings.max_length,
                           autocast, accelerator)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator:
            total = accelerator.reduce(total, reduction="sum")
        loss_value = float(total[0] / total[1])
        trained += int(total[2])
        if progress:
            progress(epoch + 1, epochs, loss_value)
    if settings.gradient_checkpointing:
        model.backbone.activation_checkpointing_disable()
    if settings.master_dtype == "float32":
        model.backbone.to(loaded_dtype)
    return loss_value, forwarded + trained, trained


def _initialise(model, first_step, pad_id, micro, max_length, mean_reward) -> int:
    """Feature statistics over the positions of the first step (in micro-batches; the same whatever the
    micro-batch and process count), then the head: the reward model's head when V starts from a reward
    model, else a zero head at the mean reward. Returns the real tokens it forwarded."""
    tokens = 0
    with torch.no_grad():
        moments = 0
        for s in range(0, len(first_step), micro):
            ids, mask, positions, _ = batch_tensors(first_step[s:s + micro], pad_id, model.head.weight.device,
                                                    max_length)
            features = model.features(ids, mask)[positions.bool()].double()
            tokens += int(mask.sum())
            moments = moments + torch.stack([torch.ones_like(features[0]) * len(features), features.sum(0),
                                             (features ** 2).sum(0)])
        count, total, squares = moments
        mean = total / count
        variance = (squares - count * mean ** 2) / (count - 1).clamp_min(1)
        model.feature_mean.copy_(mean.float())
        model.feature_scale.copy_(variance.clamp_min(0).sqrt().float().clamp_min(1e-4))
        reward_head = getattr(model, "reward_head", None)
        if reward_head is not None:  # w.(h - m)/s' with w' = w s and b' = w.m + b gives w.h + b
            weight, bias = (t.to(model.head.weight.device) for t in reward_head)
            model.head.weight.copy_((weight * model.feature_scale)[None])
            model.head.bias.copy_(weight @ model.feature_mean + bias)
        else:
            nn.init.constant_(model.head.bias, mean_reward)
    return tokens


def _step(wrapped, step, rank, processes, micro, pad_id, device, max_length, autocast, accelerator):
    """Accumulate this process's share of one optimizer step's gradient; return [sse / 2, positions,
    real tokens forwarded and backwarded]."""
    share = math.ceil(len(step) / processes)
    mine = step[rank * share:(rank + 1) * share]
    micro_batches = math.ceil(share / micro)  # the same count on every process (collectives match)
    step_positions = sum(counted_positions(e, max_length) for e in step)
    out = torch.zeros(3, dtype=torch.float64, device=device)
    for m in range(micro_batches):
        chunk = mine[m * micro:(m + 1) * micro]
        last = m == micro_batches - 1
        with accelerator.no_sync(wrapped) if accelerator and not last else nullcontext():
            if chunk:
                ids, mask, positions, targets = batch_tensors(chunk, pad_id, device, max_length)
            else:  # a process with nothing left in a short last step still joins the gradient exchange
                ids = torch.full((1, 1), pad_id, dtype=torch.long).to(device)
                mask, positions, targets = torch.ones_like(ids), torch.zeros(1, 1).to(device), torch.zeros(1).to(device)
            with autocast:
                values = wrapped(ids, mask)
            sse = (((values.float() - targets[:, None]) ** 2) * positions).sum()
            # data-parallel engines average gradients over processes: scale back to a sum
            loss = 0.5 * sse * processes / step_positions
            if accelerator:
                accelerator.backward(loss)
            else:
                loss.backward()
        real = mask.sum().double() if chunk else torch.zeros((), dtype=torch.float64, device=device)
        out += torch.stack([0.5 * sse.detach().double(), positions.sum().double(), real.to(device)])
    return out


def train_settings(config, accelerator=None) -> TrainSettings:
    """The ``TrainSettings`` a ``spi.config.ValueConfig`` asks for."""
    return TrainSettings(config.micro_batch_size, config.gradient_checkpointing, config.master_dtype,
                         config.max_length, accelerator)
