"""The decoding arms of the decode benchmark (spi.bench.decode): their settings, and ``Arms``, which loads
what the requested arms need once and decodes the benchmark's prompts with one of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from spi.bench.measure import BenchConfig, ForwardTimer, unique_params

ARMS = ("sampling", "hf_generate", "best_of_n", "cbs_head", "cbs_cached_value", "cbs_reencode", "weak_to_strong")
PARTS = ("policy_forward", "value_forward", "reward_forward", "cache_reorder", "sampling", "selection",
         "text_decode")


@dataclass
class DecodeBenchConfig(BenchConfig):
    prompts: int = 4
    width: int = 2
    successors: int = 4
    tokens: int = 32
    chunk_length: int = 8
    burn_in: int = 1
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    reward: str = "tiny-reward"  # hf-classifier reward model for best_of_n
    value_backbone: str | None = None  # separate value model; None = a copy of the policy's architecture
    w2s_tuned: str = "tiny-llama"
    w2s_untuned: str = "tiny-llama-b"
    rss: str = "subprocess"  # or "sampled" or "none"
    batching: bool = True  # the 8-prompts-in-one-batch vs one-at-a-time figure
    batching_rows: int = 1
    matmul_size: int = 1024
    device: str = "cpu"  # every model of every arm goes there

    @property
    def rows(self) -> int:
        return self.width * self.successors


class Arms:
    """Loads what the requested arms need once; ``run(name)`` decodes the benchmark's prompts once."""

    def __init__(self, config: DecodeBenchConfig, arms: list[str]):
        from spi.models import CausalLM
        from spi.prompt_sets import load_instructions
        from spi.search import SearchSettings

        self.config, c = config, config
        self.policy = CausalLM.load(c.model, c.dtype, c.device)
        self.instructions = load_instructions("builtin:train", 0, c.prompts)
        self.seeds = [c.seed * 1000 + i for i in range(c.prompts)]
        self.plain = SearchSettings(width=1, successors=c.rows, chunk_length=None, max_new_tokens=c.tokens,
                                    batch_prompts=c.prompts, ignore_eos=True, final_pick="value")
        self.cbs = SearchSettings(width=c.width, successors=c.successors, chunk_length=c.chunk_length,
                                  max_new_tokens=c.tokens, batch_prompts=c.prompts, ignore_eos=True,
                                  final_pick="value")
        self.value_params = None
        torch_dtype = self.policy.model.dtype
        if "best_of_n" in arms:
            from spi.reward import ClassifierReward

            self.reward = ClassifierReward(c.reward, dtype=c.dtype, device=c.device)
        if "cbs_head" in arms:
            from spi.value import new_value_model

            self.head = _random_head(new_value_model("policy-head", self.policy.model, self.policy.name), c.seed)
            self.head = self.head.to(torch_dtype)
        if {"cbs_cached_value", "cbs_reencode"} & set(arms):
            from spi.value import new_value_model

            self.backbone = new_value_model("backbone", self.policy.model, self.policy.name,
                                            backbone_name=c.value_backbone or c.model, dtype=c.dtype,
                                            device=c.device)
            self.backbone = _random_head(self.backbone, c.seed + 1).eval()
            self.value_params = unique_params(self.backbone.backbone)
        if "weak_to_strong" in arms:
            from spi.models import load_causal_lm

            self.w2s = (load_causal_lm(c.w2s_tuned, c.dtype, c.device), load_causal_lm(c.w2s_untuned, c.dtype, c.device))

    def guide(self, name):
        from spi.guides import CachedValueGuide, ImplicitRewardGuide, ReencodeValueGuide
        from spi.systems import value_guide

        pad = self.policy.tokenizer.pad_token_id
        if name == "cbs_head":
            return value_guide([self.head], [1.0], self.policy)
        if name == "cbs_cached_value":
            return CachedValueGuide(self.backbone, pad)
        if name == "cbs_reencode":
            return ReencodeValueGuide(self.backbone, self.policy.tokenizer)
        if name == "weak_to_strong":
            return ImplicitRewardGuide(*self.w2s, pad)
        raise ValueError(name)

    def run(self, name: str, prompts: int | None = None, rows: int | None = None,
            batch_prompts: int | None = None) -> dict:
        """Decode once; return seconds, generated tokens, scorer tokens and the breakdown by part."""
        from spi.search import search

        instructions, seeds = self.instructions, self.seeds
        if prompts is not None:
            from spi.prompt_sets import load_instructions

            instructions, seeds = load_instructions("builtin:train", 0, prompts), list(range(prompts))
        if name == "hf_generate":
            return self._hf_generate(instructions)
        settings, guide, reward = self.plain, None, None
        if rows is not None:
            settings = replace(settings, successors=rows)
        if batch_prompts is not None:
            settings = replace(settings, batch_prompts=batch_prompts)
        if name == "best_of_n":
            settings, reward = replace(settings, final_pick="reward"), self.reward
        elif name != "sampling":
            settings, guide = self.cbs, self.guide(name)
        start, cpu = time.perf_counter(), time.process_time()
        out = search(self.policy, instructions, seeds, settings, guide, reward_model=reward, progress=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        c = out.compute
        parts = {p: c.seconds.get(p, 0.0) for p in PARTS}
        parts["other"] = max(0.0, seconds - sum(parts.values()))
        return {"seconds": seconds, "cpu_seconds": cpu, "generated_tokens": c.generated_tokens, "policy_tokens": c.policy_tokens,
                "value_tokens": c.value_tokens, "w2s_tokens": c.w2s_tokens, "value_calls": c.value_calls, "reward_calls": c.reward_calls,
                "parts": parts, "ids": [r.response_ids for r in out.results]}

    def _hf_generate(self, instructions) -> dict:
        from spi.prompts import chat_prompt_ids

        c, tokenizer, model = self.config, self.policy.tokenizer, self.policy.model
        prompts = [chat_prompt_ids(tokenizer, x) for x in instructions]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts]).to(self.policy.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).to(self.policy.device)
        timer = ForwardTimer(model)
        torch.manual_seed(c.seed)
        start, cpu = time.perf_counter(), time.process_time()
        try:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.6,
                                     top_k=50, top_p=0.9, num_return_sequences=c.rows, max_new_tokens=c.tokens,
                                     min_new_tokens=c.tokens, pad_token_id=pad)
        finally:
            timer.remove()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        generated = int(out.shape[0] * (out.shape[1] - width))
        parts = {p: 0.0 for p in PARTS}
        parts["policy_forward"] = timer.seconds
        parts["other"] = max(0.0, seconds - timer.seconds)
        return {"seconds": seconds, "cpu_seconds": cpu, "generated_tokens": generated, "policy_tokens": generated + ids.numel() * c.rows,
                "value_tokens": 0, "w2s_tokens": 0, "value_calls": 0, "reward_calls": 0, "parts": parts,
                "ids": None}


def _random_head(value_model, seed: int):
    """A fixed random value head, so that selection really reorders beams (a zero head never would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = value_model.head.weight
        w.copy_(torch.randn(w.shape, generator=generator) / w.shape[-1] ** 0.5)
    return value_model
