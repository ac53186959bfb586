"""Data-parallel value fitting: one backbone value model trained by N processes through ``accelerate``.

``launch_value_fit`` starts ``job.processes`` processes on this machine (one per GPU, or CPU processes
with the gloo backend), each creating an ``accelerate.Accelerator`` (DDP, or FSDP2 sharding with
``strategy="fsdp"``), loading the backbone, and running ``spi.value.fit_value`` on its share of every
step (``spi.value_train``); process 0 saves the value model folder. ``fit_value_distributed`` is the
call a pipeline stage or a flow task makes with a recipe. The effective batch is ``value.batch_size``
whatever the process count, so N processes train the same model as one (up to float reassociation).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FitJob:
    policy_name: str
    backbone: str
    pad_id: int
    processes: int = 2
    device: str = "cuda"  # "cpu": gloo processes (tests); else one process per visible GPU
    strategy: str = "ddp"  # or "fsdp"
    epochs: int = 10
    learning_rate: float = 3e-6
    batch_size: int = 16
    weight_decay: float = 0.0
    holdout_fraction: float = 0.0
    seed: int = 0  # step order and hold-out split
    init_seed: int = 0  # torch seed before the model is built (LoRA initialisation)
    lora_rank: int = 0
    dtype: str = "float32"
    init_from_reward: bool = False
    micro_batch_size: int | None = None
    gradient_checkpointing: bool = False
    master_dtype: str = "float32"
    max_length: int | None = None


def fit_value_distributed(recipe, examples, pad_id: int, out: str | Path, init_seed: int) -> Path:
    """Fit V_k as ``recipe.value`` asks, with ``value.processes`` processes; the folder ``out``."""
    cfg = recipe.value
    device = cfg.device or recipe.policy.device
    job = FitJob(recipe.policy.model, cfg.backbone, pad_id, cfg.processes, device.split(":")[0], cfg.strategy,
                 cfg.epochs, cfg.learning_rate, cfg.batch_size, cfg.weight_decay, cfg.holdout_fraction,
                 recipe.seed, init_seed, cfg.lora_rank, cfg.dtype or recipe.policy.dtype, cfg.init_from_reward,
                 cfg.micro_batch_size, cfg.gradient_checkpointing, cfg.master_dtype, cfg.max_length)
    return launch_value_fit(job, examples, out)


def launch_value_fit(job: FitJob, examples, out: str | Path) -> Path:
    """Run ``job`` in ``job.processes`` processes; return the saved value model folder."""
    import torch.multiprocessing as mp

    if job.strategy not in ("ddp", "fsdp"):
        raise ValueError(f"value.strategy must be 'ddp' or 'fsdp', not {job.strategy!r}")
    out = Path(out)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(job, examples, str(out), port), nprocs=job.processes, join=True,
                       start_method="spawn")
    if not (out / "value.json").exists():
        raise RuntimeError(f"the distributed value fit ended without saving {out}")
    return out


def _worker(rank: int, job: FitJob, examples, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(job.processes))
    import torch
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    from spi.value import fit_value, new_value_model
    from spi.value_train import TrainSettings

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2) if job.strategy == "fsdp" else None
    accelerator = Accelerator(cpu=job.device == "cpu", fsdp_plugin=plugin)

    def build(device):
        torch.manual_seed(job.init_seed)
        return new_value_model("backbone", None, job.policy_name, job.backbone, job.lora_rank, job.dtype,
                               device, job.init_from_reward)

    model = build(str(accelerator.device))
    settings = TrainSettings(job.micro_batch_size, job.gradient_checkpointing, job.master_dtype, job.max_length,
                             accelerator)
    fit_value(model, examples, job.pad_id, None, job.epochs, job.learning_rate, job.batch_size, job.weight_decay,
              job.holdout_fraction, seed=job.seed, train=settings)
    state = accelerator.get_state_dict(model) if job.strategy == "fsdp" else None
    if accelerator.is_main_process:
        if state is not None:  # the gathered full weights, into an unsharded copy
            saved = build("cpu")
            saved.load_state_dict(state)
            saved.report = model.report
            model = saved
        model.save(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
