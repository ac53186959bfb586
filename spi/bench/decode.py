"""Decoding benchmark: every decoding arm side by side in one process, same prompts, same token count.

Arms (N = W*K rows per prompt, every row generates exactly ``tokens`` tokens: EOS is masked):
    sampling          our plain sampling of N rows (the floor): search(W=1, K=N, L=None)
    hf_generate       transformers generate(num_return_sequences=N, do_sample=True, min_new_tokens=tokens)
    best_of_n         sampling + final scoring of the N leaves by a reward model
    cbs_head          CBS (W, K, L) guided by a value head on the policy's hidden state
    cbs_cached_value  CBS guided by a separate value backbone with its own KV cache (CachedValueGuide)
    cbs_reencode      CBS guided by the same value backbone re-encoding prompt + prefix (the peers' method)
    weak_to_strong    CBS guided by log pi_tuned - log pi_untuned of two small models, both cached

Timing: arms are run in a rotated order in every repeat (burn-in repeats are discarded) and each arm's
figures are medians over repeats, so a noisy neighbour on a shared machine hits all arms alike. Ratios
are medians of per-repeat ratios, by wall clock (``ratio_to_*``) and by this process's CPU time
(``ratio_to_*_cpu``): on a machine shared with other jobs the CPU-time ratio is the steadier one, since
time-slicing by other processes does not count in it (cache and memory-bandwidth contention still does).
Peak RSS: with ``rss="subprocess"`` every arm runs once more in a fresh Python process that loads only
what the arm needs, and the arm's peak RSS is that process's VmHWM (models + decode); with
``rss="sampled"`` a thread samples this process's RSS every 2 ms while the arm runs (all arms' models
are loaded, so the figure includes them: cheap, used by the tests).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch

ARMS = ("sampling", "hf_generate", "best_of_n", "cbs_head", "cbs_cached_value", "cbs_reencode", "weak_to_strong")
PARTS = ("policy_forward", "value_forward", "reward_forward", "cache_reorder", "sampling", "selection",
         "text_decode")


@dataclass
class DecodeBenchConfig:
    model: str = "smollm2-135m-instruct"
    prompts: int = 4
    width: int = 2
    successors: int = 4
    tokens: int = 32
    chunk_length: int = 8
    dtype: str = "float32"
    threads: int = 1
    repeats: int = 3
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
    seed: int = 0
    device: str = "cpu"  # every model of every arm goes there

    @property
    def rows(self) -> int:
        return self.width * self.successors


# ---------------------------------------------------------------- resources


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


# ---------------------------------------------------------------- arms


class Arms:
    """Loads what the requested arms need once; ``run(name)`` decodes the benchmark's prompts once."""

    def __init__(self, config: DecodeBenchConfig, arms: list[str]):
        from spi.models import CausalLM
        from spi.prompts import load_instructions
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
            from spi.prompts import load_instructions

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
                "value_tokens": c.value_tokens, "value_calls": c.value_calls, "reward_calls": c.reward_calls,
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
                "value_tokens": 0, "value_calls": 0, "reward_calls": 0, "parts": parts, "ids": None}


def _random_head(value_model, seed: int):
    """A fixed random value head, so that selection really reorders beams (a zero head never would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = value_model.head.weight
        w.copy_(torch.randn(w.shape, generator=generator) / w.shape[-1] ** 0.5)
    return value_model


# ---------------------------------------------------------------- the benchmark


def _median(values):
    return statistics.median(values) if values else float("nan")


def run_decode_bench(config: DecodeBenchConfig, log=print) -> dict:
    torch.set_num_threads(config.threads)
    unknown = set(config.arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    arms = [a for a in ARMS if a in config.arms]
    if "sampling" not in arms:
        arms.insert(0, "sampling")
    dtype = torch.float32 if config.dtype == "float32" else getattr(torch, config.dtype)
    log(f"matmul peak ({config.matmul_size}^3, {config.dtype}, {config.threads} threads) ...")
    peak = matmul_peak_gflops(dtype, config.matmul_size, device=config.device)
    peak_f32 = peak if dtype == torch.float32 else matmul_peak_gflops(torch.float32, config.matmul_size,
                                                                      device=config.device)
    log(f"  {peak:.1f} GFLOP/s" + ("" if dtype == torch.float32 else f" (float32: {peak_f32:.1f})"))
    bench = Arms(config, arms)
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    sampled_rss: dict[str, float] = {}
    for r in range(config.burn_in + config.repeats):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for name in order:
            probe: dict = {}
            with sampled_peak_rss(probe):
                result = bench.run(name)
            sampled_rss[name] = max(sampled_rss.get(name, 0.0), probe["peak"])
            tag = "burn-in" if r < config.burn_in else f"repeat {r - config.burn_in + 1}"
            log(f"  [{tag}] {name}: {result['seconds']:.2f} s, {result['generated_tokens']} tokens")
            if r >= config.burn_in:
                runs[name].append(result)

    policy = bench.policy.model
    flops_per_token = 2 * matmul_params(policy)
    out_arms = {}
    for name in arms:
        rs = runs[name]
        seconds = _median([x["seconds"] for x in rs])
        tokens = rs[0]["generated_tokens"]
        parts = {p: _median([x["parts"][p] for x in rs]) for p in rs[0]["parts"]}
        out_arms[name] = {
            "seconds": seconds, "tokens_per_s": tokens / seconds, "generated_tokens": tokens,
            "policy_tokens": rs[0]["policy_tokens"], "value_tokens": rs[0]["value_tokens"],
            "value_calls": rs[0]["value_calls"], "reward_calls": rs[0]["reward_calls"],
            "value_tokens_per_generated": rs[0]["value_tokens"] / tokens if tokens else 0.0,
            "breakdown_s": parts, "breakdown_fraction": {p: v / seconds for p, v in parts.items()},
            "seconds_all_repeats": [x["seconds"] for x in rs],
            "cpu_seconds": _median([x["cpu_seconds"] for x in rs]),
            "cpu_seconds_all_repeats": [x["cpu_seconds"] for x in rs],
        }
        forward = parts["policy_forward"]
        achieved = flops_per_token * rs[0]["policy_tokens"] / forward / 1e9 if forward > 0 else float("nan")
        out_arms[name]["policy_forward_gflops"] = achieved
        out_arms[name]["policy_forward_fraction_of_peak"] = achieved / peak
    # ratios from per-repeat pairs (arms of one repeat ran back to back), medians over repeats
    for name in arms:
        for base, key in (("sampling", "ratio_to_sampling"), ("hf_generate", "ratio_to_hf_generate")):
            for clock, suffix in (("seconds", ""), ("cpu_seconds", "_cpu")):
                if base in runs:
                    pairs = [a[clock] / b[clock] for a, b in zip(runs[name], runs[base], strict=True)]
                    out_arms[name][key + suffix] = _median(pairs)
                else:
                    out_arms[name][key + suffix] = None

    if config.rss == "subprocess":
        for name in arms:
            log(f"  peak RSS of {name} in a fresh process ...")
            out_arms[name]["peak_rss_mb"] = _subprocess_rss(config, name)
        rss_method = "VmHWM of a fresh process that loads only the arm's models and decodes once"
    elif config.rss == "sampled":
        for name in arms:
            out_arms[name]["peak_rss_mb"] = sampled_rss[name]
        rss_method = "RSS of the benchmark process sampled every 2 ms during the arm (all arms' models loaded)"
    else:
        for name in arms:
            out_arms[name]["peak_rss_mb"] = None
        rss_method = "not measured"

    checks = {}
    if "cbs_head" in out_arms:
        checks["cbs_head_ratio_target"] = 1.10
    if "cbs_cached_value" in out_arms and bench.value_params:
        ratio = bench.value_params / unique_params(policy)
        checks["value_policy_param_ratio"] = ratio
        checks["cbs_cached_value_ratio_target"] = (1 + ratio) * 1.10
    for arm, target in (("cbs_head", checks.get("cbs_head_ratio_target")),
                        ("cbs_cached_value", checks.get("cbs_cached_value_ratio_target"))):
        if target is not None:
            checks[f"{arm}_meets_target"] = out_arms[arm]["ratio_to_sampling"] <= target
            checks[f"{arm}_meets_target_cpu"] = out_arms[arm]["ratio_to_sampling_cpu"] <= target
    if "hf_generate" in out_arms:
        checks["sampling_at_least_hf_speed"] = out_arms["sampling"]["ratio_to_hf_generate"] <= 1.0
        checks["sampling_at_least_hf_speed_cpu"] = out_arms["sampling"]["ratio_to_hf_generate_cpu"] <= 1.0

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command_config": asdict(config),
        "machine": {"cores": os.cpu_count(), "threads": config.threads, "dtype": config.dtype,
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cpu": _cpu_name(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "model": config.model, "policy_params": unique_params(policy),
        "policy_matmul_flops_per_token": flops_per_token,
        "matmul_peak_gflops": peak, "matmul_peak_gflops_float32": peak_f32,
        "rows_per_prompt": config.rows, "prompts": config.prompts, "tokens_per_row": config.tokens,
        "peak_rss_method": rss_method, "arms": out_arms, "checks": checks,
    }
    if config.batching:
        log("batching: 8 prompts in one batch vs one at a time ...")
        result["batching"] = batching_figure(bench, config, log)
        checks["batching_speedup_target"] = 3.0
        checks["batching_meets_target"] = result["batching"]["speedup"] >= 3.0
        checks["batching_meets_target_cpu"] = result["batching"]["speedup_cpu"] >= 3.0
    return result


def batching_figure(bench: Arms, config: DecodeBenchConfig, log=print, prompts: int = 8) -> dict:
    """Plain sampling of ``prompts`` prompts (``batching_rows`` rows each) in one batch vs one at a time."""
    times = {"batched": [], "one_at_a_time": []}
    cpu = {"batched": [], "one_at_a_time": []}
    tokens = None
    for r in range(config.burn_in + config.repeats):
        order = ["batched", "one_at_a_time"] if r % 2 == 0 else ["one_at_a_time", "batched"]
        for arm in order:
            res = bench.run("sampling", prompts=prompts, rows=config.batching_rows,
                            batch_prompts=prompts if arm == "batched" else 1)
            tokens = res["generated_tokens"]
            if r >= config.burn_in:
                times[arm].append(res["seconds"])
                cpu[arm].append(res["cpu_seconds"])
    b, o = _median(times["batched"]), _median(times["one_at_a_time"])
    speedup = _median([y / x for x, y in zip(times["batched"], times["one_at_a_time"], strict=True)])
    speedup_cpu = _median([y / x for x, y in zip(cpu["batched"], cpu["one_at_a_time"], strict=True)])
    log(f"  batched {tokens / b:.1f} tokens/s, one at a time {tokens / o:.1f} tokens/s: {speedup:.2f}x "
        f"(CPU time {speedup_cpu:.2f}x)")
    return {"prompts": prompts, "rows_per_prompt": config.batching_rows, "generated_tokens": tokens,
            "batched_tokens_per_s": tokens / b, "one_at_a_time_tokens_per_s": tokens / o, "speedup": speedup,
            "speedup_cpu": speedup_cpu, "seconds": times, "cpu_seconds": cpu}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _subprocess_rss(config: DecodeBenchConfig, arm: str) -> float | None:
    cfg = replace(config, arms=[arm], repeats=1, burn_in=0, rss="none", batching=False)
    cmd = [sys.executable, "-m", "spi.bench.decode", "--single-arm", json.dumps(asdict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS subprocess for arm {arm} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _single_arm(config_json: str) -> None:
    config = DecodeBenchConfig(**json.loads(config_json))
    torch.set_num_threads(config.threads)
    arm = config.arms[0]
    Arms(config, [arm]).run(arm)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak across fork+exec
    into a child's ru_maxrss, so every child of a big benchmark process would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- printing

def format_table(result: dict) -> str:
    m = result["machine"]
    head = (f"{result['model']} {m['dtype']}, {m['threads']} threads of {m['cores']} cores ({m['cpu_capability']}), "
            f"torch {m['torch']}; {result['prompts']} prompts x {result['rows_per_prompt']} rows x "
            f"{result['tokens_per_row']} tokens; matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s")
    cols = ["arm", "tok/s", "x sampl", "x sampl cpu", "x HF", "x HF cpu", "val tok", "fwd%", "val%", "samp%", "reord%", "sel%", "dec%", "other%",
            "RSS MB"]
    rows = []
    for name, a in result["arms"].items():
        f = a["breakdown_fraction"]

        def pct(p, f=f):
            return f"{100 * f.get(p, 0):.1f}"

        def ratio(x):
            return "-" if x is None else f"{x:.2f}"

        rows.append([name, f"{a['tokens_per_s']:.1f}", ratio(a["ratio_to_sampling"]), ratio(a["ratio_to_sampling_cpu"]),
                     ratio(a["ratio_to_hf_generate"]), ratio(a["ratio_to_hf_generate_cpu"]),
                     str(a["value_tokens"]), pct("policy_forward"), pct("value_forward"), pct("sampling"), pct("cache_reorder"),
                     pct("selection"), pct("text_decode"), pct("other"),
                     "-" if a["peak_rss_mb"] is None else f"{a['peak_rss_mb']:.0f}"])
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    s = result["arms"]["sampling"]
    lines.append(f"policy forward in sampling: {s['policy_forward_gflops']:.1f} GFLOP/s = "
                 f"{100 * s['policy_forward_fraction_of_peak']:.0f}% of the matmul peak")
    if "batching" in result:
        b = result["batching"]
        lines.append(f"batching {b['prompts']} prompts x {b['rows_per_prompt']} rows: {b['batched_tokens_per_s']:.1f} "
                     f"tok/s in one batch vs {b['one_at_a_time_tokens_per_s']:.1f} one at a time ({b['speedup']:.2f}x; "
                     f"by CPU time {b['speedup_cpu']:.2f}x)")
    lines.append("checks: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                          for k, v in result["checks"].items()}))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--single-arm":
        _single_arm(sys.argv[2])
    else:
        sys.exit("usage: python -m spi.bench.decode --single-arm CONFIG_JSON (use `spi bench decode`)")
