"""bfloat16 matrix products on CPUs without native bfloat16 instructions.

Without AVX-512 BF16 or AMX, PyTorch runs a bfloat16 ``nn.Linear`` through a generic kernel that is
8-10x slower than float32 on the same CPU (README, decoding benchmark). The same product computed as a
float32 GEMM of the upcast operands is exact in its inputs (bfloat16 -> float32 is lossless) and
accumulates in float32 as the native bfloat16 kernels do; only the result is rounded to bfloat16. The
weights stay in bfloat16: each layer's float32 copy lives for one product only.

``SPI_BF16_MATMUL``: ``auto`` (default: float32 GEMM where the CPU lacks bfloat16 instructions),
``float32`` (always), ``native`` (PyTorch's bfloat16 kernel). The two kernels are compared by
``python -m spi.bench.bf16``.
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
