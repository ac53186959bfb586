"""Measurements the benchmarks share: the machine they ran on, resident memory (sampled in a thread, or a
process's peak), the matrix-multiply peak of this CPU, parameter counts and time spent in a module's forward.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class BenchConfig:
    """Settings every benchmark has: the model, its dtype, the torch threads, timed repeats and the seed."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    threads: int = 1
    repeats: int = 3
    seed: int = 0


def machine(threads: int, dtype: str, detail: bool = False) -> dict:
    """Where a benchmark ran: cores, threads, dtype and torch (``detail``: CPU, Python and load too)."""
    out = {"cores": os.cpu_count(), "threads": threads, "dtype": dtype, "torch": torch.__version__}
    if detail:
        out.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu=cpu_name(),
                   python=platform.python_version(), load_average=os.getloadavg())
    return out


def now() -> str:
    """The local date and time a result is stamped with."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def median(values):
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def sampled_peak_rss(out: dict, period: float = 0.002):
    """Sample RSS in a thread while the block runs; out['peak'] and out['before'] in MB."""
    out["before"] = out["peak"] = rss_mb()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss_mb())
            stop.wait(period)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = max(out["peak"], rss_mb())


def matmul_peak_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 3, device: str = "cpu") -> float:
    """Best-of-``repeats`` GFLOP/s of one size^3 matrix multiply at the current thread count, through the
    kernel the models' linear layers use (for bfloat16 on CPUs without its instructions: float32 GEMMs)."""
    from spi import bf16_cpu

    layer = torch.nn.Linear(size, size, bias=False).to(device, dtype)
    bf16_cpu.adapt(layer)
    x = torch.randn(size, size).to(device, dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.no_grad():
        layer(x)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            layer(x)
            sync()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def matmul_params(model) -> int:
    """Parameters that take part in a matrix multiply per token (embedding lookup excluded, lm_head kept)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not isinstance(head, torch.nn.Linear):
        total += head.weight.numel()
    return total


def unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class ForwardTimer:
    """Wall time spent inside ``module.forward`` (hooks), to break down arms we do not instrument (HF)."""

    def __init__(self, module):
        self.seconds, self._start = 0.0, None
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._start = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._start

    def remove(self):
        for h in self._handles:
            h.remove()


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak across fork+exec
    into a child's ru_maxrss, so every child of a big benchmark process would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
