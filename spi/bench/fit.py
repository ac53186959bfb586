"""Value-fitting throughput: sequences and tokens per second, head-only vs full backbone.

Synthetic examples (chat-templated built-in prompts, random response tokens, random rewards) go through
``spi.value.fit_value`` exactly as an SPI iteration would call it. The head-only kind computes the
frozen policy features once and then trains the head for every epoch; the backbone kind runs forward
and backward through the whole backbone every epoch. Throughput counts every epoch's sequences and
response positions (``epochs * examples / seconds``); the feature pass of the head-only kind is timed
inside the same seconds.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from spi.bench.measure import BenchConfig, machine, now


@dataclass
class FitBenchConfig(BenchConfig):
    """``model`` is the policy (head-only kind) and the backbone (backbone kind)."""

    repeats: int = 1
    examples: int = 32
    response_tokens: int = 32
    epochs: int = 2
    batch_size: int = 16
    kinds: tuple[str, ...] = ("policy-head", "backbone")


def _examples(tokenizer, config: FitBenchConfig):
    from spi.prompt_sets import load_instructions
    from spi.prompts import chat_prompt_ids
    from spi.value import ValueExample

    rng = random.Random(config.seed)
    instructions = load_instructions("builtin:train", 0, min(config.examples, 16))
    vocab = len(tokenizer)
    out = []
    for i in range(config.examples):
        prompt = chat_prompt_ids(tokenizer, instructions[i % len(instructions)])
        response = [rng.randrange(vocab) for _ in range(config.response_tokens)]
        out.append(ValueExample(prompt, response, rng.gauss(0, 1), f"p{i % len(instructions)}"))
    return out


def run_fit_bench(config: FitBenchConfig, log=print) -> dict:
    from spi.models import CausalLM
    from spi.value import fit_value, new_value_model

    torch.set_num_threads(config.threads)
    policy = CausalLM.load(config.model, config.dtype)
    examples = _examples(policy.tokenizer, config)
    pad = policy.tokenizer.pad_token_id
    positions = sum(len(e.response_ids) + 1 for e in examples)
    times: dict[str, list[float]] = {k: [] for k in config.kinds}
    for r in range(config.repeats):
        for kind in (config.kinds if r % 2 == 0 else tuple(reversed(config.kinds))):
            model = new_value_model(kind, policy.model, policy.name, backbone_name=config.model, dtype=config.dtype)
            start = time.perf_counter()
            fit_value(model, examples, pad, policy=policy.model, epochs=config.epochs,
                      batch_size=config.batch_size, holdout_fraction=0.0, seed=config.seed)
            times[kind].append(time.perf_counter() - start)
            log(f"  {kind}: {times[kind][-1]:.2f} s")
            del model
    kinds = {}
    for kind, ts in times.items():
        seconds = statistics.median(ts)
        kinds[kind] = {"seconds": seconds, "sequences_per_s": config.epochs * len(examples) / seconds,
                       "tokens_per_s": config.epochs * positions / seconds, "seconds_all_repeats": ts}
    result = {"date": now(), "command_config": asdict(config), "machine": machine(config.threads, config.dtype),
              "examples": len(examples), "response_positions": positions, "kinds": kinds}
    if {"policy-head", "backbone"} <= set(kinds):
        result["head_speedup_over_backbone"] = kinds["backbone"]["seconds"] / kinds["policy-head"]["seconds"]
    return result


def format_table(result: dict) -> str:
    c, m = result["command_config"], result["machine"]
    lines = [f"value fit on {c['model']} {m['dtype']}, {m['threads']} threads: {result['examples']} sequences x "
             f"{c['response_tokens']} response tokens, {c['epochs']} epochs, batch {c['batch_size']}"]
    for kind, k in result["kinds"].items():
        lines.append(f"  {kind:12s} {k['seconds']:8.2f} s  {k['sequences_per_s']:8.1f} seq/s  "
                     f"{k['tokens_per_s']:9.1f} tok/s")
    if "head_speedup_over_backbone" in result:
        lines.append(f"  head-only is {result['head_speedup_over_backbone']:.1f}x faster than the full backbone")
    return "\n".join(lines)
