"""bfloat16 forward on the CPU: PyTorch's bfloat16 kernel against float32 GEMMs (spi.bf16_cpu).

    python -m spi.bench.bf16 [--model smollm2-135m-instruct] [--rows 8] [--tokens 64] [--repeats 3] [--threads 1]

Both arms load the same model in bfloat16; one keeps PyTorch's kernel (``native``), the other routes its
linear layers through float32 GEMMs (``float32``). They run alternately in this process after one
burn-in round; the figures are medians, with the largest logit difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spi.bf16_cpu import adapt, cpu_has_bf16_instructions
from spi.models import load_causal_lm


def compare(model: str, rows: int, tokens: int, repeats: int) -> dict:
    """Seconds of one bfloat16 forward of ``rows`` x ``tokens`` tokens with PyTorch's kernel and with
    float32 GEMMs, measured alternately in this process (medians), with the largest logit difference."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spi.bench.bf16",
                                     description="bfloat16 forward: PyTorch's kernel vs float32 GEMMs")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = compare(a.model, a.rows, a.tokens, a.repeats)
    print(f"{a.model}, {a.rows} x {a.tokens} tokens, {a.threads} threads, CPU bfloat16 instructions: "
          f"{cpu_has_bf16_instructions()}")
    print(f"  native bfloat16 kernel  {r['native'] * 1e3:9.1f} ms")
    print(f"  float32 GEMMs           {r['float32'] * 1e3:9.1f} ms  ({r['speedup']:.2f}x faster)")
    print(f"  largest logit difference {r['max_logit_difference']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
