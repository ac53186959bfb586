"""A prepared check for a GPU machine: a few minutes that show the paper-scale path works.

    python -m spi.bench.gpu_check                # on a GPU: Llama-3-8B shape, bfloat16, cuda
    python -m spi.bench.gpu_check --reduced      # tiny shapes on the CPU (what the tests run)

Steps:
1. decode: the decoding benchmark (``spi.bench.decode``) on a Llama-3-8B-shaped policy initialised at
   random in bfloat16, every row generating exactly ``tokens`` tokens; it prints the benchmark's table,
   the same ratios as the CPU benchmark (x sampling, x HF generate, breakdown by part). Arms whose text
   would be meaningless with a random 128k-vocabulary policy and SmolLM2's 49k tokenizer are left out
   (re-encoded text, weak-to-strong with a 49k-vocabulary pair).
2. value fit: a backbone value model of the same shape (``--fit-layers`` of its 32 layers: a full 8B
   fit with float32 master weights needs ~128 GB of optimizer state, the source shards it over 4 GPUs)
   for a few epochs with float32 master weights, bfloat16 autocast, micro-batches and gradient
   checkpointing; it prints the loss per epoch and checks that it moves.
3. ``--smoke``: the smoke experiment's SPI loop (``spi.pipeline.run_spi``) with every model on the device,
   with the transformers backend and with vLLM (recorded as skipped, with the reason, where vLLM cannot run).
Writes everything to ``--out`` as JSON as well.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass

import torch

GPU_ARMS = ["sampling", "hf_generate", "best_of_n", "cbs_head", "cbs_cached_value"]


@dataclass
class CheckConfig:
    model: str = "random:llama-3-8b"
    device: str = "cuda"
    dtype: str = "bfloat16"
    prompts: int = 4
    width: int = 4
    successors: int = 4
    tokens: int = 128
    chunk_length: int = 16
    repeats: int = 2
    fit_layers: int = 8
    fit_examples: int = 16
    fit_response_tokens: int = 256
    fit_batch: int = 8
    fit_micro_batch: int = 2
    fit_epochs: int = 3
    fit_learning_rate: float = 1e-5
    threads: int = 1

    @classmethod
    def reduced(cls) -> CheckConfig:
        return cls(model="random:tiny", device="cpu", dtype="float32", prompts=2, width=2, successors=2,
                   tokens=8, chunk_length=4, repeats=1, fit_layers=2, fit_examples=8, fit_response_tokens=8,
                   fit_batch=4, fit_micro_batch=2, fit_epochs=3, fit_learning_rate=1e-3)


def check_decode(config: CheckConfig, log=print) -> dict:
    from spi.bench.decode import DecodeBenchConfig, format_table, run_decode_bench

    bench = DecodeBenchConfig(model=config.model, prompts=config.prompts, width=config.width,
                              successors=config.successors, tokens=config.tokens, chunk_length=config.chunk_length,
                              dtype=config.dtype, threads=config.threads, repeats=config.repeats, burn_in=1,
                              arms=GPU_ARMS, rss="none", batching=True, device=config.device,
                              matmul_size=4096 if config.device != "cpu" else 256)
    result = run_decode_bench(bench, log=log)
    log(format_table(result))
    return result


def _fit_examples(tokenizer, vocab: int, config: CheckConfig):
    from spi.prompt_sets import load_instructions
    from spi.prompts import chat_prompt_ids
    from spi.value import ValueExample

    rng = random.Random(0)
    instructions = load_instructions("builtin:train", 0, config.fit_examples)
    examples = []
    for i, x in enumerate(instructions):
        response = [rng.randrange(100, vocab) for _ in range(config.fit_response_tokens)]
        # a learnable reward: the share of response tokens from the lower half of the vocabulary
        reward = sum(t < vocab // 2 for t in response) / len(response)
        examples.append(ValueExample(chat_prompt_ids(tokenizer, x), response, reward, f"p{i}"))
    return examples


def check_value_fit(config: CheckConfig, log=print) -> dict:
    from spi.models import load_tokenizer
    from spi.value import fit_value, new_value_model
    from spi.value_train import TrainSettings

    name = f"{config.model}:{config.fit_layers}"
    tokenizer = load_tokenizer(name)
    model = new_value_model("backbone", None, name, name, dtype=config.dtype, device=config.device)
    params = sum(p.numel() for p in model.backbone.parameters())
    examples = _fit_examples(tokenizer, model.backbone.config.vocab_size, config)
    losses: list[float] = []
    if config.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fit_value(model, examples, tokenizer.pad_token_id, None, epochs=config.fit_epochs,
              learning_rate=config.fit_learning_rate, batch_size=config.fit_batch, holdout_fraction=0.0,
              progress=lambda epoch, epochs, loss: (losses.append(loss), log(f"  epoch {epoch}/{epochs}: loss {loss:.5f}")),
              train=TrainSettings(micro_batch_size=config.fit_micro_batch, gradient_checkpointing=True))
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if config.device.startswith("cuda") else None
    tokens = config.fit_epochs * sum(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    out = {"model": name, "backbone_params": params, "losses": losses, "loss_moved": losses[-1] < losses[0],
           "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_gpu_gib": peak}
    log(f"value fit on {name} ({params / 1e9:.2f}B parameters, {config.dtype} with float32 master weights): "
        f"loss {losses[0]:.5f} -> {losses[-1]:.5f} in {seconds:.1f} s ({out['tokens_per_s']:.0f} tokens/s)"
        + (f", peak {peak:.1f} GiB" if peak is not None else ""))
    return out


def check_smoke(config: CheckConfig, workdir: str, log=print, backends=("transformers", "vllm")) -> dict:
    """The smoke experiment's SPI loop with the policy on the device, once per generation backend; a
    backend that cannot run here is recorded with the reason."""
    from pathlib import Path

    from spi.backends import vllm_unavailable_reason
    from spi.config import load_recipe
    from spi.loop import run_spi
    from spi.pipeline import heldout_instructions

    out = {}
    for backend in backends:
        problem = vllm_unavailable_reason() if backend == "vllm" else None
        if problem:
            out[backend] = {"skipped": problem}
            log(f"smoke experiment on {backend}: skipped ({problem})")
            continue
        recipe = load_recipe("smoke", overrides={"policy": {"device": config.device},
                                                 "execution": {"backend": backend}})
        instructions = heldout_instructions(recipe, 4)
        start = time.perf_counter()
        summary = run_spi(recipe, Path(workdir) / backend, instructions, ["base-sampled", "best-of-n", "spi-1"],
                          progress=False)
        log(f"smoke experiment on {config.device} with {backend}: {time.perf_counter() - start:.1f} s, mean "
            "rewards " + ", ".join(f"{k} {v['mean_reward']:.3f}" for k, v in summary["systems"].items()))
        out[backend] = summary
    return out


def run_check(config: CheckConfig, smoke_workdir: str | None = None, log=print) -> dict:
    torch.set_num_threads(config.threads)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "config": asdict(config), "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name() if config.device.startswith("cuda") else "cpu"}
    log(f"GPU check on {result['device_name']}: decode benchmark ({config.model}, {config.dtype})")
    result["decode"] = check_decode(config, log)
    log("value fit")
    result["value_fit"] = check_value_fit(config, log)
    if smoke_workdir:
        result["smoke"] = check_smoke(config, smoke_workdir, log)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reduced", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--device", help="override the device (default cuda, or cpu with --reduced)")
    parser.add_argument("--tokens", type=int, help="fixed response length of the decode benchmark")
    parser.add_argument("--fit-layers", type=int, help="layers of the value backbone (32 = the full 8B)")
    parser.add_argument("--smoke", metavar="WORKDIR", help="also run the smoke experiment there")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    config = CheckConfig.reduced() if args.reduced else CheckConfig()
    for field, value in (("device", args.device), ("tokens", args.tokens), ("fit_layers", args.fit_layers)):
        if value is not None:
            setattr(config, field, value)
    result = run_check(config, args.smoke)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
