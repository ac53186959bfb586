"""``spi run``, ``spi promote`` and ``spi generate`` (mounted by flows/cli.py through :func:`add_commands`).

    spi run RECIPE [--set section.field=value ...] [--workdir DIR] [--summary-json FILE]
    spi promote NAME [--workdir DIR | --tracking-uri URI] [--margin M >= 0] [--stages]
    spi generate --prompts SOURCE (--system NAME --workdir DIR [--recipe R] | --model models:/NAME@ALIAS)
                 --out OUT.jsonl     a fitted system answers any prompts (spi.generate); resumable

``spi run`` runs the experiment flow in this process. Its Prefect API: PREFECT_API_URL, else the running
stack's (``spi up``), else a temporary server that dies with this process (flows.stack.temporary).
MLflow: the recipe's tracking.tracking_uri, else MLFLOW_TRACKING_URI, else the running stack's server,
else a SQLite file in the work directory (flows.context.resolve_tracking_uri; ``spi promote`` and
``spi generate`` resolve the same way and never create a database). Before the first stage every model
resolves and every data file parses in full (flows.preflight). Bad input (unknown recipe field, missing
model, corrupt data file, unreachable tracking URI, corrupt stage file, unknown registered model) ends
with one ``error: ...`` line and exit code 2; finished stages are kept and a rerun resumes from them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
# The temporary Prefect API starts as a subprocess; on a busy 2-core machine it needs more than 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run an SPI experiment (iterations, baselines, judging, tracking)",
        description="Run an SPI experiment flow in this process.",
    )
    p.add_argument("recipe", help="built-in recipe name (smoke, paper) or a recipe YAML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a recipe field (value parsed as YAML); repeatable",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="root for stage files, MLflow and the store (default: execution.workdir)",
    )
    p.add_argument(
        "--summary-json", default=None, metavar="FILE", help="write a JSON summary of the run here"
    )
    p.add_argument(
        "--allow-reward-judge",
        action="store_true",
        help="allow judging with the reward model the experiment trained on (reported as such)",
    )
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "promote",
        help="promote a registered value model's candidate to champion",
        description="Move alias champion to the candidate version when it beats the "
        "champion by more than the margin.",
    )
    p.add_argument("registered_model", help="registered model name, e.g. smoke-value")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workdir", default="runs", help="work directory whose mlflow.db holds the registry, "
                       "when neither MLFLOW_TRACKING_URI is set nor a stack (`spi up`) runs")
    where.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default: "
                       "MLFLOW_TRACKING_URI, else the running stack's MLflow server, else --workdir's mlflow.db)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="win-rate points (>= 0) that the lower bound of the 95%% paired interval of "
                   "candidate - champion must exceed")
    p.add_argument("--stages", action="store_true", help="also mirror the deprecated registry stages")
    p.set_defaults(func=cmd_promote)
    add_generate_command(subparsers)


def add_generate_command(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="decode a prompts file with a fitted system (spi-k of a work directory, or a registered model)",
        description="Decode every prompt with a system of a finished experiment or a registered guided "
        "policy; writes {prompt, response, system[, key]} JSON lines. Resumable: a rerun skips the "
        "prompts already in OUT.",
    )
    p.add_argument("--prompts", required=True, help="prompts: a JSON/JSONL file, hub id, generated:SPLIT, ifbench:test")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--system", help="a system of the experiment in --workdir, e.g. spi-3, best-of-n")
    which.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a guided policy folder")
    p.add_argument("--workdir", default=None, help="the experiment's work directory (with --system; with "
                   "--model: where mlflow.db is, default runs)")
    p.add_argument("--recipe", default=None, help="the recipe the experiment ran (default: the built-in one its summary names)")
    p.add_argument("--tracking-uri", default=None, help="MLflow registry URI for --model models:/...")
    p.add_argument("--out", required=True, help="output JSONL (appended to; its .generate.json sidecar records the system)")
    p.add_argument("--batch", type=int, default=None, help="prompts per written batch (default search.batch_prompts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def bad_input_errors() -> tuple[type[BaseException], ...]:
    from evaluation.data import DataError
    from evaluation.judges import JudgeSpecError
    from flows.context import StageError
    from flows.stack.plan import ServiceError
    from mlflow_store.registry import RegistryError
    from mlflow_store.store import StoreError
    from mlflow_store.tracking import TrackingURIError
    from spi.config import RecipeError
    from spi.models import ModelNotFoundError

    return (
        RecipeError,
        ModelNotFoundError,  # a model that is neither an alias, a folder, nor a reachable or cached hub id
        ServiceError,  # a corrupt state file of the stack, a temporary Prefect server that does not start
        TrackingURIError,
        StoreError,
        RegistryError,
        StageError,
        JudgeSpecError,
        DataError,
        OSError,  # a missing or unreadable file, a corrupt gzip
        ValueError,  # incl. JSON decode errors and prompt-set errors naming file and row
    )


def report_error(err: BaseException) -> int:
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_run(args) -> int:
    from flows.context import load_run_recipe
    from mlflow_store.store import Store
    from mlflow_store.tracking import client_for
    from spi.config import parse_overrides

    errors = bad_input_errors()
    try:  # fail before anything starts: recipe, judge, models, data files, tracking URI, store URL
        overrides = parse_overrides(args.overrides)
        recipe = load_run_recipe(args.recipe, overrides)  # the flow reads this same parsed recipe
        from flows.context import RunContext
        from flows.experiment import check_judge
        from flows.preflight import check_inputs

        ctx = RunContext(recipe, args.workdir)
        check_judge(ctx, args.allow_reward_judge)
        check_inputs(recipe)
        client_for(ctx.tracking_uri)
        Store(ctx.store_url).close()
    except errors as err:
        return report_error(err)

    from flows.experiment import spi_experiment
    from flows.stack.temporary import prefect_api

    print(f"spi run {recipe.name} ({recipe.digest}): files in {ctx.dir}")
    print(f"  MLflow {ctx.tracking_uri} (experiment {ctx.experiment}), store {ctx.store_url}")
    started = time.perf_counter()
    try:
        with prefect_api(lambda line: print(f"  {line}", flush=True)):
            summary = spi_experiment(
                recipe=args.recipe,
                overrides=overrides or None,
                workdir=str(ctx.root),
                allow_reward_judge=args.allow_reward_judge,
            )
    except errors as err:
        print("finished stages are kept; rerun the same command to resume", file=sys.stderr)
        return report_error(err)
    seconds = time.perf_counter() - started
    if args.summary_json:
        out = {
            "tracking_uri": summary["tracking_uri"],
            "experiment_run_id": summary["experiment_run_id"],
            "store_url": summary["store_url"],
            "judge": summary["judge"],
            "reward_model": summary["reward_model"],
            "registered_model": summary["registered_model"],
            "report": summary["report"],
            "seconds": seconds,
            "stages": summary["stages"],
            "systems": {
                name: {
                    k: row.get(k)
                    for k in (
                        "iteration",
                        "mean_reward",
                        "win_rate",
                        "length_controlled_winrate",
                        "policy_tokens",
                    )
                }
                for name, row in summary["systems"].items()
            },
            "task": summary["task"],
            "first_iteration": summary["first_iteration"],
            "later_iterations": summary.get("later_iterations"),
            "paired": summary["paired"],
            "value_fits": {k: {m: _finite(rep.get(m)) for m in ("holdout_pair_accuracy", "holdout_explained_variance")}
                           for k, rep in summary["value_fits"].items()},
        }
        if summary["task"] == "ifeval":  # the four IFEval numbers and their intervals under each system
            from evaluation.ifeval import METRICS

            for name, row in summary["systems"].items():
                out["systems"][name]["metrics"] = {
                    k: row[k] for m in METRICS for k in (m, f"{m}_ci_low", f"{m}_ci_high")}
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(out, indent=1))
    counts = {}
    for state in summary["stages"].values():
        counts[state] = counts.get(state, 0) + 1
    print()
    print(f"done in {seconds:.0f} s; stages: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print(f"  stage files   {ctx.dir}")
    print(
        f"  MLflow        {summary['tracking_uri']}  experiment '{summary['experiment']}', "
        f"run {summary['experiment_run_id']}  (mlflow ui --backend-store-uri {summary['tracking_uri']})"
    )
    print(f"  store         {summary['store_url']}")
    if summary["registered_model"]:
        champion = [p for p in summary["promotions"] if p["promoted"]]
        print(
            f"  registry      models:/{summary['registered_model']}@candidate"
            + (f", champion = version {champion[-1]['candidate_version']}" if champion else "")
        )
    print(f"  report        {summary['report']}")
    if args.summary_json:
        print(f"  summary       {args.summary_json}")
    print(f"\njudge: {summary['judge']} (reward model used for training: {summary['reward_model']})")
    print(summary["table"])
    return 0


def _finite(x):
    """A number for the JSON summary; NaN (no held-out pairs) and infinities become null."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def cmd_promote(args) -> int:
    from evaluation.metrics import check_margin
    from flows.context import resolve_tracking_uri
    from mlflow_store.tracking import TrackingURIError

    errors = bad_input_errors()
    try:
        check_margin(args.margin)
    except ValueError as err:
        return report_error(ValueError(f"--margin: {err}"))
    try:  # --tracking-uri > MLFLOW_TRACKING_URI > the running stack > <workdir>/mlflow.db (never created here)
        uri = resolve_tracking_uri(args.tracking_uri, args.workdir, must_exist=True)
    except TrackingURIError as err:
        return report_error(LookupError(f"no registered model named '{args.registered_model}': {err}"))
    try:
        from mlflow_store.registry import get_version

        get_version(uri, args.registered_model, "candidate")  # clear error before a flow run starts
        from flows.model_flows import promote_value_model
        from flows.stack.temporary import prefect_api

        with prefect_api(lambda line: print(line, file=sys.stderr)):
            decision = promote_value_model(
                registered_model=args.registered_model,
                tracking_uri=uri,
                margin=args.margin,
                use_stages=args.stages,
            )
    except errors as err:
        return report_error(err)
    verb = "promoted" if decision["promoted"] else "not promoted"
    print(
        f"{args.registered_model} ({uri}): candidate version {decision['candidate_version']} {verb}: "
        f"{decision['reason']}"
    )
    return 0


def _generate_plan(args, stack):
    """The plan of ``spi generate``: from a work directory's stage files or a guided policy folder."""
    import tempfile
    from dataclasses import replace

    from spi import generate
    from spi.config import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else None
    if args.system:
        if not args.workdir:
            raise generate.GenerateError("--system needs --workdir (the experiment's work directory)")
        recipe = recipe or generate.recipe_of_workdir(Path(args.workdir))
        return generate.workdir_plan(recipe, args.workdir, args.system)
    if not args.model.startswith("models:/"):
        return generate.policy_plan(Path(args.model), recipe)
    from flows.context import resolve_tracking_uri
    from mlflow_store.registry import load_registered_value_model
    from mlflow_store.tracking import TrackingURIError

    ref = args.model.removeprefix("models:/")
    name, sep, alias = ref.partition("@") if "@" in ref else ref.partition("/")
    if not (name and sep and alias):
        raise generate.GenerateError(f"--model {args.model}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        uri = resolve_tracking_uri(args.tracking_uri, args.workdir or "runs", must_exist=True)
    except TrackingURIError as err:
        raise generate.GenerateError(f"no registered model {name!r}: {err}") from None
    download = stack.enter_context(tempfile.TemporaryDirectory(prefix="spi-generate-"))
    folder = load_registered_value_model(name, alias, uri, download)
    return replace(generate.policy_plan(folder, recipe), source=args.model)


def cmd_generate(args) -> int:
    from contextlib import ExitStack

    from spi import generate

    errors = bad_input_errors()
    with ExitStack() as stack:
        try:  # every check before a model loads: prompts, system, work directory, output
            prompts, pairs = generate.load_prompts(args.prompts)
            plan = _generate_plan(args, stack)
            generate.check_output(plan, args.out)
            generate.prepare(plan, prompts)
            if args.batch is not None and args.batch < 1:
                raise generate.GenerateError(f"--batch must be a positive integer, got {args.batch}")
        except errors as err:
            return report_error(err)
        print(f"spi generate: {plan.system} ({plan.digest}) from {plan.source} on {len(pairs)} prompts "
              f"of {prompts.name} -> {args.out}", file=sys.stderr)
        try:
            counts = generate.generate(plan, pairs, args.out, args.batch, progress=not args.no_progress)
        except errors as err:
            print("finished prompts are kept; rerun the same command to resume", file=sys.stderr)
            return report_error(err)
    print(f"{args.out}: {counts['decoded']} prompts decoded, {counts['done']} already there, "
          f"{counts['total']} in all ({plan.system})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m flows.commands run RECIPE ...`` (same as ``spi run``)."""
    from flows.cli import main as spi_main

    return spi_main(argv)


if __name__ == "__main__":
    sys.exit(main())
