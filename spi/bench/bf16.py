"""bfloat16 forward on the CPU: PyTorch's bfloat16 kernel against float32 GEMMs (spi.bf16_cpu).

    spi bench bf16 (or python -m spi.bench.bf16) [--model smollm2-135m-instruct] [--rows 8] [--tokens 64] [--repeats 3] [--threads 1]

Both arms load the same model in bfloat16; one keeps PyTorch's kernel (``native``), the other routes its
linear layers through float32 GEMMs (``float32``). They run alternately in this process after one
burn-in round; the figures are medians, with the largest logit difference between the two. torch and the
models are imported when the comparison runs, so that `spi` can offer the command without loading them.
"""

from __future__ import annotations

import argparse
import statistics
import time


def compare(model: str, rows: int, tokens: int, repeats: int) -> dict:
    """Seconds of one bfloat16 forward of ``rows`` x ``tokens`` tokens with PyTorch's kernel and with
    float32 GEMMs, measured alternately in this process (medians), with the largest logit difference."""
    import torch

    from spi.bf16_cpu import adapt
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The comparison's options (``python -m spi.bench.bf16`` and ``spi bench bf16`` alike)."""
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> dict:
    """``compare`` at ``args.threads`` torch threads; the result also names its settings and the CPU."""
    import torch

    from spi.bf16_cpu import cpu_has_bf16_instructions

    torch.set_num_threads(args.threads)
    result = compare(args.model, args.rows, args.tokens, args.repeats)
    settings = {k: getattr(args, k) for k in ("model", "rows", "tokens", "repeats", "threads")}
    return {**settings, "cpu_bf16_instructions": cpu_has_bf16_instructions(), **result}


def format_result(r: dict) -> str:
    return "\n".join([
        f"{r['model']}, {r['rows']} x {r['tokens']} tokens, {r['threads']} threads, CPU bfloat16 instructions: "
        f"{r['cpu_bf16_instructions']}",
        f"  native bfloat16 kernel  {r['native'] * 1e3:9.1f} ms",
        f"  float32 GEMMs           {r['float32'] * 1e3:9.1f} ms  ({r['speedup']:.2f}x faster)",
        f"  largest logit difference {r['max_logit_difference']:.4f}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spi.bench.bf16",
                                     description="bfloat16 forward: PyTorch's kernel vs float32 GEMMs")
    add_arguments(parser)
    print(format_result(run(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
