"""`spi bench decode | fit | bf16 | flow | shards`: decoding, value-fitting, bfloat16-kernel, orchestration
and sharding benchmarks.

The decode, fit and bf16 benchmarks live in spi.bench (plain library code); this module parses arguments,
prints the table and writes the JSON. `bench flow` needs Prefect and MLflow and `bench shards` a Dask
cluster, so they live here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _write(result: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {out}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_decode(args) -> int:
    from spi.bench.decode import ARMS, DecodeBenchConfig, format_table, run_decode_bench

    arms = args.arms.split(",") if args.arms else list(ARMS)
    config = DecodeBenchConfig(
        model=args.model, prompts=args.prompts, width=args.width, successors=args.successors, tokens=args.tokens,
        chunk_length=args.chunk_length, dtype=args.dtype, threads=args.threads, repeats=args.repeats,
        burn_in=args.burn_in, arms=arms, reward=args.reward, value_backbone=args.value_backbone,
        w2s_tuned=args.w2s_tuned, w2s_untuned=args.w2s_untuned, rss=args.rss, batching=not args.no_batching,
        batching_rows=args.batching_rows, matmul_size=args.matmul_size,
    )
    if args.rows is not None:
        if args.rows % config.successors:
            raise SystemExit(f"--rows {args.rows} is not a multiple of --successors {config.successors}")
        config.width = args.rows // config.successors
    result = run_decode_bench(config, log=_log)
    result["command"] = " ".join(["spi", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("spi") else None
    print(format_table(result))
    _write(result, args.out)
    return 0


def cmd_fit(args) -> int:
    from spi.bench.fit import FitBenchConfig, format_table, run_fit_bench

    config = FitBenchConfig(model=args.model, examples=args.examples, response_tokens=args.tokens,
                            epochs=args.epochs, batch_size=args.batch_size, dtype=args.dtype,
                            threads=args.threads, repeats=args.repeats, kinds=tuple(args.kinds.split(",")))
    result = run_fit_bench(config, log=_log)
    print(format_table(result))
    _write(result, args.out)
    return 0


def cmd_bf16(args) -> int:
    from spi.bench import bf16

    result = bf16.run(args)
    print(bf16.format_result(result))
    _write(result, args.out)
    return 0


def run_flow_bench(recipe: str, threads: int = 1, workdir: str | None = None, log=_log,
                   overrides: dict | None = None, repeats: int = 1, burn_in: int = 1) -> dict:
    """Wall time of an experiment through the Prefect flow (with MLflow, the store and the registry)
    against the same work as plain calls of the same stage functions (flows.experiment.run_plain), each
    in a fresh work directory, plus a rerun of the flow in its finished work directory (every stage
    cached: orchestration alone).

    ``burn_in`` untimed plain runs first pay the process's one-time costs (imports, first model loads);
    then ``repeats`` rounds run both arms, the order alternating; medians are reported. The Prefect API
    is reached and MLflow loaded before the timing, as in a long-lived process with ``spi up``'s API;
    without a running API, Prefect starts a temporary one once per process: reported apart."""
    import statistics
    import tempfile
    import time

    import torch
    from prefect.settings import PREFECT_API_URL

    torch.set_num_threads(threads)
    from flows.experiment import run_plain, spi_experiment

    root = Path(workdir or tempfile.mkdtemp(prefix="spi-bench-flow-"))
    from spi.bench.measure import machine, now
    from spi.config import load_recipe

    r = load_recipe(recipe, overrides or None)
    out: dict = {"date": now(), "recipe": recipe, "overrides": overrides or {},
                 "machine": machine(threads, r.policy.dtype),
                 "repeats": repeats, "burn_in": burn_in, "workdir": str(root)}

    log(f"warm-up: Prefect API {PREFECT_API_URL.value() or '(a temporary server, started now)'} and MLflow ...")
    start = time.perf_counter()
    _warm_up(root / "warm-up")
    out["warm_up_seconds"] = time.perf_counter() - start
    log(f"  {out['warm_up_seconds']:.1f} s")

    def plain(folder):
        return run_plain(recipe, overrides or None, str(folder))

    def flow(folder):
        return spi_experiment(recipe=recipe, overrides=overrides or None, workdir=str(folder))

    for i in range(burn_in):
        log(f"burn-in {i + 1}/{burn_in}: plain calls in {root / f'burn-in-{i}'} ...")
        plain(root / f"burn-in-{i}")
    seconds: dict[str, list[float]] = {"plain": [], "flow": []}
    results = {}
    for i in range(repeats):
        for arm in (["plain", "flow"] if i % 2 == 0 else ["flow", "plain"]):
            folder = root / f"{arm}-{i}"
            log(f"round {i + 1}/{repeats}: {arm} in {folder} ...")
            start = time.perf_counter()
            results[arm] = (plain if arm == "plain" else flow)(folder)
            seconds[arm].append(time.perf_counter() - start)
            log(f"  {seconds[arm][-1]:.1f} s")
    if set(results["flow"]["systems"]) != set(results["plain"]["systems"]):
        raise RuntimeError(f"the flow judged {sorted(results['flow']['systems'])}, the plain calls "
                           f"{sorted(results['plain']['systems'])}: not the same work")
    log("flow rerun (every stage cached) ...")
    start = time.perf_counter()
    flow(root / f"flow-{repeats - 1}")
    out["flow_rerun_seconds"] = time.perf_counter() - start
    log(f"  {out['flow_rerun_seconds']:.1f} s")
    out["systems"] = list(results["plain"]["systems"])
    out["plain_runs_seconds"], out["flow_runs_seconds"] = seconds["plain"], seconds["flow"]
    out["plain_seconds"] = statistics.median(seconds["plain"])
    out["flow_seconds"] = statistics.median(seconds["flow"])
    out["flow_over_plain"] = out["flow_seconds"] / out["plain_seconds"]
    out["flow_minus_plain_seconds"] = out["flow_seconds"] - out["plain_seconds"]
    out["flow_stage_seconds"] = _stage_seconds(results["flow"])
    out["plain_stage_seconds"] = _stage_seconds(results["plain"])
    return out


def _warm_up(folder: Path) -> None:
    """A process's one-time costs of the flow arm: reach the Prefect API (a temporary server starts here
    when none is configured) and load MLflow on a throwaway tracking database."""
    from prefect import get_client

    from mlflow_store.tracking import client_for, default_tracking_uri

    with get_client(sync_client=True) as client:
        client.hello()
    client_for(default_tracking_uri(folder)).search_experiments(max_results=1)


def _stage_seconds(summary) -> dict:
    """Seconds per stage, from whatever the flow's summary reports (its shape belongs to flows.experiment)."""
    found = {}

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                if k.startswith("seconds") and isinstance(v, int | float):
                    found[".".join([*path, k])] = v
                else:
                    walk(v, [*path, str(k)])
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, [*path, str(v.get("system", i)) if isinstance(v, dict) else str(i)])

    walk(summary, [])
    return found


def format_flow_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"recipe {result['recipe']} ({m['dtype']}, {m['threads']} threads of {m['cores']} cores), "
             f"systems {', '.join(result['systems'])}",
             f"  warm-up                  {result['warm_up_seconds']:8.1f} s  (once per process: Prefect API "
             f"reached, a temporary server started if none runs; MLflow loaded)",
             f"  plain calls              {result['plain_seconds']:8.1f} s  (median of {result['repeats']})",
             f"  Prefect flow + MLflow    {result['flow_seconds']:8.1f} s  ({result['flow_over_plain']:.3f}x, "
             f"{result['flow_minus_plain_seconds']:+.1f} s)",
             f"  flow rerun, all cached   {result['flow_rerun_seconds']:8.1f} s  (orchestration alone)"]
    return "\n".join(lines)


def cmd_flow(args) -> int:
    """The flow arm reports to the Prefect API `spi run` would use (flows.stack.temporary.prefect_api):
    the configured one, else the running stack's, else a temporary server that dies with this command."""
    from flows.stack.temporary import prefect_api

    with prefect_api(_log):
        result = run_flow_bench(args.recipe, threads=args.threads, workdir=args.workdir, log=_log,
                                overrides=_overrides(args.set), repeats=args.repeats, burn_in=args.burn_in)
    print(format_flow_table(result))
    _write(result, args.out)
    return 0


def run_shard_bench(recipe: str = "tests/flows/tiny.yaml", prompts: int = 16, workers: tuple[int, ...] = (1, 2),
                    shard_prompts: int = 2, max_new_tokens: int = 32, workdir: str | None = None) -> list[dict]:
    """Sharded iteration-1 rollouts (pi_0 sampling, W*K leaves per prompt) on a LocalCluster of each
    size in ``workers``, the same work each time, fresh files; throughput excludes cluster start-up
    and a warm-up shard per worker that loads the models. Returns one row per cluster size."""
    import tempfile
    import time

    from distributed import Client, LocalCluster

    from flows.sharded import local_cluster_kwargs, with_runner
    from spi.config import load_recipe
    from spi.stagefiles import read_jsonl

    rows, root = [], Path(workdir or tempfile.mkdtemp(prefix="spi-bench-"))
    execution = {"task_runner": "dask", "shard_prompts": shard_prompts, "threads": 1}
    base = {"iterations": {"prompts_per_iteration": prompts}, "sampling": {"max_new_tokens": max_new_tokens}}
    for n in workers:
        t_start = time.perf_counter()
        with LocalCluster(**local_cluster_kwargs(n)) as cluster, Client(cluster) as client:
            startup = time.perf_counter() - t_start
            at = {**execution, "dask_address": cluster.scheduler_address}
            warm = load_recipe(recipe, {**base, "iterations": {"prompts_per_iteration": n}, "execution": {**at, "shard_prompts": 1}})
            client.run(_warm, warm)  # every worker loads the policy once (not part of the measured work)
            r = load_recipe(recipe, {**base, "execution": at})
            t0 = time.perf_counter()
            out = with_runner(_sharded_rollouts_flow(), r)(r, str(root / f"workers-{n}"))
            seconds = time.perf_counter() - t0
        rollouts = read_jsonl(out["path"])
        tokens = sum(len(leaf["response_ids"]) for row in rollouts for leaf in row["leaves"])
        rows.append({"workers": n, "prompts": len(rollouts), "leaves": sum(len(x["leaves"]) for x in rollouts),
                     "tokens": tokens, "seconds": seconds, "startup_seconds": startup,
                     "prompts_per_s": len(rollouts) / seconds, "tokens_per_s": tokens / seconds, "digest": out["digest"]})
    return rows


def _warm(recipe) -> None:
    from spi import pipeline

    pipeline.load_policy(recipe)


def _sharded_rollouts_flow():
    """A flow of the sharded rollouts of iteration 1 alone (made on demand: `spi` does not import Prefect
    for its other commands)."""
    from prefect import flow

    from flows import sharded
    from flows.context import RunContext

    @flow(name="spi-bench-sharded-rollouts", persist_result=False)
    def sharded_rollouts(recipe, workdir: str) -> dict:
        """Only the sharded rollouts of iteration 1 (the benchmark's work)."""
        return sharded.rollouts(RunContext(recipe, workdir), 1, [])

    return sharded_rollouts


def format_shard_table(rows: list[dict]) -> str:
    lines = [f"{'workers':>8}{'prompts':>9}{'tokens':>9}{'seconds':>10}{'prompts/s':>11}{'tokens/s':>10}{'speed-up':>10}"
             f"{'start-up s':>12}"]
    for row in rows:
        lines.append(f"{row['workers']:>8}{row['prompts']:>9}{row['tokens']:>9}{row['seconds']:>10.2f}"
                     f"{row['prompts_per_s']:>11.2f}{row['tokens_per_s']:>10.1f}"
                     f"{rows[0]['seconds'] / row['seconds']:>9.2f}x{row['startup_seconds']:>12.1f}")
    same = len({row["digest"] for row in rows}) == 1
    lines.append(f"merged rollouts identical across cluster sizes: {'yes' if same else 'NO'}")
    return "\n".join(lines)


def cmd_shards(args) -> int:
    rows = run_shard_bench(args.recipe, args.prompts, tuple(args.workers), args.shard_prompts, args.max_new_tokens,
                           args.workdir)
    print(format_shard_table(rows))
    _write({"rows": rows}, args.out)
    return 0


def _overrides(items):
    if not items:
        return {}
    from spi.config import parse_overrides

    return parse_overrides(items)


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="decoding, value-fitting, bfloat16-kernel and orchestration benchmarks")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    d = sub.add_parser("decode", help="every decoding arm side by side: tokens/s, ratios, breakdown, peak RSS")
    d.add_argument("--model", default="smollm2-135m-instruct")
    d.add_argument("--prompts", type=int, default=4, help="prompts decoded together in one batch")
    d.add_argument("--rows", type=int, default=None, help="W*K rows per prompt (sets --width = rows / successors)")
    d.add_argument("--width", type=int, default=2, help="W beams kept")
    d.add_argument("--successors", type=int, default=4, help="K successors per beam")
    d.add_argument("--tokens", type=int, default=32, help="tokens generated per row (EOS masked)")
    d.add_argument("--chunk-length", type=int, default=8, help="L tokens per chunk of the CBS arms")
    d.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--burn-in", type=int, default=1)
    d.add_argument("--arms", default=None, help="comma-separated subset of the arms (sampling is always run)")
    d.add_argument("--reward", default="tiny-reward", help="hf-classifier reward model of the best_of_n arm")
    d.add_argument("--value-backbone", default=None,
                   help="separate value model of the cached/re-encode arms (default: the policy's model)")
    d.add_argument("--w2s-tuned", default="tiny-llama")
    d.add_argument("--w2s-untuned", default="tiny-llama-b")
    d.add_argument("--rss", choices=["subprocess", "sampled", "none"], default="subprocess",
                   help="peak RSS per arm: a fresh process per arm, or sampling this process")
    d.add_argument("--no-batching", action="store_true", help="skip the 8-prompt batching figure")
    d.add_argument("--batching-rows", type=int, default=1, help="rows per prompt in the batching figure")
    d.add_argument("--matmul-size", type=int, default=1024)
    d.add_argument("--out", default=None, help="write the JSON here")
    d.set_defaults(func=cmd_decode)

    f = sub.add_parser("fit", help="value fitting throughput, head-only vs full backbone")
    f.add_argument("--model", default="smollm2-135m-instruct")
    f.add_argument("--examples", type=int, default=32)
    f.add_argument("--tokens", type=int, default=32, help="response tokens per example")
    f.add_argument("--epochs", type=int, default=2)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--repeats", type=int, default=1)
    f.add_argument("--kinds", default="policy-head,backbone")
    f.add_argument("--out", default=None)
    f.set_defaults(func=cmd_fit)

    b = sub.add_parser("bf16", help="bfloat16 forward on the CPU: PyTorch's kernel vs float32 GEMMs")
    from spi.bench.bf16 import add_arguments

    add_arguments(b)
    b.add_argument("--out", default=None, help="write the JSON here")
    b.set_defaults(func=cmd_bf16)

    w = sub.add_parser("flow", help="orchestration overhead: the Prefect flow with MLflow vs the same stages as plain calls")
    w.add_argument("--recipe", default="smoke")
    w.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    w.add_argument("--repeats", type=int, default=1, help="rounds of both arms, order alternating (medians)")
    w.add_argument("--burn-in", type=int, default=1, help="untimed plain runs first (one-time costs)")
    w.add_argument("--out", default=None)
    w.set_defaults(func=cmd_flow)

    h = sub.add_parser("shards", help="throughput of sharded rollouts with 1 and 2 (or more) local Dask workers")
    h.add_argument("--recipe", default="tests/flows/tiny.yaml")
    h.add_argument("--prompts", type=int, default=16)
    h.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    h.add_argument("--shard-prompts", type=int, default=2)
    h.add_argument("--max-new-tokens", type=int, default=32)
    h.add_argument("--workdir", default=None)
    h.add_argument("--out", default=None)
    h.set_defaults(func=cmd_shards)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.bench decode ...`: the same commands without the rest of the `spi` command."""
    import argparse
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="spi")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
