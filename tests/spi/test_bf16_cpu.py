"""bfloat16 products as float32 GEMMs on CPUs without bfloat16 instructions: same weights, same
results up to bfloat16 rounding, chosen by SPI_BF16_MATMUL."""

import pytest
import torch

from spi import bf16_cpu
from spi.models import load_causal_lm


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_float32_gemm_matches_the_native_bfloat16_kernel(monkeypatch):
    ids = torch.tensor([[1, 400, 2000, 31, 7, 911, 12]])
    monkeypatch.setenv("SPI_BF16_MATMUL", "native")
    native = load_causal_lm("tiny-llama", "bfloat16")
    assert not any(isinstance(m, bf16_cpu.Float32GemmLinear) for m in native.modules())
    monkeypatch.setenv("SPI_BF16_MATMUL", "float32")
    routed = load_causal_lm("tiny-llama", "bfloat16")
    linears = [m for m in routed.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bf16_cpu.Float32GemmLinear) for m in linears)
    # the weights stay bfloat16, one copy: the float32 operand exists for one product only
    assert all(p.dtype == torch.bfloat16 for p in routed.parameters())
    assert sum(p.numel() for p in routed.parameters()) == sum(p.numel() for p in native.parameters())
    reference = _logits(load_causal_lm("tiny-llama", "float32"), ids)
    a, b = _logits(native, ids), _logits(routed, ids)
    scale = reference.abs().max()
    # both accumulate in float32 and round to bfloat16: they differ by rounding, not by method
    assert (a - b).abs().max() <= 0.05 * scale
    assert (b - reference).abs().max() <= (a - reference).abs().max() * 1.5 + 1e-3 * scale
    assert a.argmax(-1).eq(b.argmax(-1)).float().mean() >= 0.85


def test_auto_mode_follows_the_cpu_and_float32_models_are_untouched(monkeypatch):
    monkeypatch.setenv("SPI_BF16_MATMUL", "auto")
    model = load_causal_lm("tiny-llama", "bfloat16")
    routed = any(isinstance(m, bf16_cpu.Float32GemmLinear) for m in model.modules())
    assert routed == (not bf16_cpu.cpu_has_bf16_instructions())
    monkeypatch.setenv("SPI_BF16_MATMUL", "float32")
    assert bf16_cpu.adapt(load_causal_lm("tiny-llama", "float32")) == 0


def test_a_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("SPI_BF16_MATMUL", "fast")
    with pytest.raises(ValueError, match="SPI_BF16_MATMUL"):
        load_causal_lm("tiny-llama", "bfloat16")


def test_kernel_comparison_times_both_arms_on_the_same_input():
    """spi.bench.bf16 (the benchmark moved out of spi.bf16_cpu): both arms timed, their ratio reported, and
    their logits differ by bfloat16 rounding only."""
    from spi.bench.bf16 import compare

    result = compare("tiny-llama", rows=2, tokens=5, repeats=1)
    assert result["native"] > 0 and result["float32"] > 0
    assert result["speedup"] == pytest.approx(result["native"] / result["float32"])
    assert 0 <= result["max_logit_difference"] < 0.5
