"""bfloat16 matrix products on CPUs without native bfloat16 instructions.

Without AVX-512 BF16 or AMX, PyTorch runs a bfloat16 ``nn.Linear`` through a generic kernel that is
8-10x slower than float32 on the same CPU (README, decoding benchmark). The same product computed as a
float32 GEMM of the upcast operands is exact in its inputs (bfloat16 -> float32 is lossless) and
accumulates in float32 as the native bfloat16 kernels do; only the result is rounded to bfloat16. The
weights stay in bfloat16: each layer's float32 copy lives for one product only.

``SPI_BF16_MATMUL``: ``auto`` (default: float32 GEMM where the CPU lacks bfloat16 instructions),
``float32`` (always), ``native`` (PyTorch's bfloat16 kernel).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("auto", "float32", "native")


@lru_cache(maxsize=1)
def cpu_has_bf16_instructions() -> bool:
    """True where the CPU advertises AVX-512 BF16 or AMX BF16 (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust PyTorch's kernels
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Float32GemmLinear(nn.Linear):
    """An ``nn.Linear`` holding bfloat16 weights whose product runs as a float32 GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def adapt(model: nn.Module, chosen: str | None = None) -> int:
    """Route the bfloat16 ``nn.Linear`` layers of a CPU model through float32 GEMMs, or back to PyTorch's
    kernel, as ``chosen`` (default: ``SPI_BF16_MATMUL``) asks; returns how many layers are routed."""
    chosen = chosen or os.environ.get("SPI_BF16_MATMUL", "auto")
    if chosen not in MODES:
        raise ValueError(f"SPI_BF16_MATMUL (the bfloat16 matmul mode) must be one of {', '.join(MODES)}, "
                         f"not {chosen!r}")
    use_float32 = chosen == "float32" or (chosen == "auto" and not cpu_has_bf16_instructions())
    routed = 0
    for module in model.modules():
        if (type(module) in (nn.Linear, Float32GemmLinear) and module.weight.dtype == torch.bfloat16
                and module.weight.device.type == "cpu"):
            module.__class__ = Float32GemmLinear if use_float32 else nn.Linear
            routed += use_float32
    return routed


def compare(model: str, rows: int, tokens: int, repeats: int) -> dict:
    """Seconds of one bfloat16 forward of ``rows`` x ``tokens`` tokens with PyTorch's kernel and with
    float32 GEMMs, measured alternately in this process (medians), with the largest logit difference."""
    import statistics
    import time

    from spi.models import load_causal_lm

    models = {name: load_causal_lm(model, "bfloat16") for name in ("native", "float32")}
    for name, m in models.items():
        adapt(m, name)
    ids = torch.randint(100, 1000, (rows, tokens), generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    logits = {}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round is a burn-in
            for name, m in models.items():
                start = time.perf_counter()
                logits[name] = m(input_ids=ids).logits.float()
                seconds[name].append(time.perf_counter() - start)
    out = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    out["speedup"] = out["native"] / out["float32"]
    out["max_logit_difference"] = float((logits["native"] - logits["float32"]).abs().max())
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="bfloat16 forward: PyTorch's kernel vs float32 GEMMs")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    r = compare(a.model, a.rows, a.tokens, a.repeats)
    print(f"{a.model}, {a.rows} x {a.tokens} tokens, {a.threads} threads, CPU bfloat16 instructions: "
          f"{cpu_has_bf16_instructions()}")
    print(f"  native bfloat16 kernel  {r['native'] * 1e3:9.1f} ms")
    print(f"  float32 GEMMs           {r['float32'] * 1e3:9.1f} ms  ({r['speedup']:.2f}x faster)")
    print(f"  largest logit difference {r['max_logit_difference']:.4f}")
