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
import subprocess
import sys
from dataclasses import asdict, replace

import torch

from spi.bench.arms import ARMS, PARTS, Arms, DecodeBenchConfig  # noqa: F401  (the benchmark's public names)
from spi.bench.measure import (
    machine,
    matmul_params,
    matmul_peak_gflops,
    median,
    now,
    peak_rss_mb,
    sampled_peak_rss,
    unique_params,
)


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
        seconds = median([x["seconds"] for x in rs])
        tokens = rs[0]["generated_tokens"]
        parts = {p: median([x["parts"][p] for x in rs]) for p in rs[0]["parts"]}
        out_arms[name] = {
            "seconds": seconds, "tokens_per_s": tokens / seconds, "generated_tokens": tokens,
            "policy_tokens": rs[0]["policy_tokens"], "value_tokens": rs[0]["value_tokens"],
            "w2s_tokens": rs[0]["w2s_tokens"],
            "value_calls": rs[0]["value_calls"], "reward_calls": rs[0]["reward_calls"],
            "value_tokens_per_generated": rs[0]["value_tokens"] / tokens if tokens else 0.0,
            "breakdown_s": parts, "breakdown_fraction": {p: v / seconds for p, v in parts.items()},
            "seconds_all_repeats": [x["seconds"] for x in rs],
            "cpu_seconds": median([x["cpu_seconds"] for x in rs]),
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
                    out_arms[name][key + suffix] = median(pairs)
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
        "date": now(),
        "command_config": asdict(config),
        "machine": machine(config.threads, config.dtype, detail=True),
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
    b, o = median(times["batched"]), median(times["one_at_a_time"])
    speedup = median([y / x for x, y in zip(times["batched"], times["one_at_a_time"], strict=True)])
    speedup_cpu = median([y / x for x, y in zip(cpu["batched"], cpu["one_at_a_time"], strict=True)])
    log(f"  batched {tokens / b:.1f} tokens/s, one at a time {tokens / o:.1f} tokens/s: {speedup:.2f}x "
        f"(CPU time {speedup_cpu:.2f}x)")
    return {"prompts": prompts, "rows_per_prompt": config.batching_rows, "generated_tokens": tokens,
            "batched_tokens_per_s": tokens / b, "one_at_a_time_tokens_per_s": tokens / o, "speedup": speedup,
            "speedup_cpu": speedup_cpu, "seconds": times, "cpu_seconds": cpu}


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


# ---------------------------------------------------------------- printing

def format_table(result: dict) -> str:
    m = result["machine"]
    head = (f"{result['model']} {m['dtype']}, {m['threads']} threads of {m['cores']} cores ({m['cpu_capability']}), "
            f"torch {m['torch']}; {result['prompts']} prompts x {result['rows_per_prompt']} rows x "
            f"{result['tokens_per_row']} tokens; matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s")
    cols = ["arm", "tok/s", "x sampl", "x sampl cpu", "x HF", "x HF cpu", "scorer tok", "fwd%", "val%", "samp%", "reord%", "sel%", "dec%", "other%",
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
                     str(a["value_tokens"] + a["w2s_tokens"]), pct("policy_forward"), pct("value_forward"), pct("sampling"), pct("cache_reorder"),
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
