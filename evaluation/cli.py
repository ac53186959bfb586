"""``spi eval ...`` subcommands (mounted by flows/cli.py through :func:`add_eval_commands`).

    spi eval leaderboard --eval-set FILE --outputs DIR --preferences DIR --out FILE.json
    spi eval train-judge --eval-set FILE --outputs DIR --preferences DIR --out DIR [--backbone minilm-l6]
    spi eval judge-agreement --eval-set FILE --outputs DIR --preferences DIR [--backbone minilm-l6]
    spi eval judge --eval-set FILE --outputs FILE --judge SPEC [--judge-arg k=v] --out FILE.json
    spi eval ifeval --prompts FILE --responses FILE --out FILE.json

Standalone: ``python -m evaluation.cli leaderboard ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _common(p: argparse.ArgumentParser, *, outputs_help="folder of <model>.jsonl.gz with {index, output}"):
    p.add_argument("--eval-set", required=True, help="eval set file or folder (eval_set.jsonl or AlpacaEval JSON)")
    p.add_argument("--outputs", required=True, help=outputs_help)
    p.add_argument("--preferences", required=True, help="folder of <model>.jsonl.gz with {index, preference}")


def _subset_args(p):
    p.add_argument("--n", type=int, default=None, help="use a deterministic subset of n instructions")
    p.add_argument("--stratify", action="store_true", help="stratify the subset by the dataset field")


def add_eval_commands(subparsers) -> None:
    """Register the evaluation subcommands on an argparse subparsers object."""
    from .judges import judge_syntaxes

    p = subparsers.add_parser("leaderboard", help="score outputs+preferences folders into a leaderboard JSON")
    _common(p)
    p.add_argument("--out", required=True, help="JSON file: {model: {win_rate, length_controlled_winrate, ...}}")
    p.add_argument("--glm-weights", default=None,
                   help="alpaca_eval's glm_weights_length_controlled_v1.csv, for the regularisation toward the "
                        "gamed baselines (their outputs must be in --outputs); default: the file of that name "
                        "beside the preferences folder, if present")
    p.add_argument("--no-difficulty", action="store_true", help="drop the instruction-difficulty term")
    p.add_argument("--compare", default=None, help="a published leaderboard CSV to print MAE / Spearman against")
    _subset_args(p)
    p.set_defaults(func=cmd_leaderboard)

    p = subparsers.add_parser("train-judge", help="train the Bradley-Terry judge on preference files")
    _common(p)
    p.add_argument("--out", required=True, help="folder for the judge (head + checksum)")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--max-tokens", type=int, default=128)
    _subset_args(p)
    p.set_defaults(func=cmd_train_judge)

    p = subparsers.add_parser("judge-agreement", help="agreement with the preferences on held-out models+instructions")
    _common(p)
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    _subset_args(p)
    p.set_defaults(func=cmd_judge_agreement)

    add_ifeval_command(subparsers)

    p = subparsers.add_parser("judge", help="judge one model's AlpacaEval-format outputs against the references")
    p.add_argument("--eval-set", required=True)
    p.add_argument("--outputs", required=True, help="AlpacaEval JSON/JSONL: {instruction, output, generator}")
    p.add_argument("--references", default=None,
                   help="AlpacaEval JSON/JSONL outputs of the reference generator (e.g. the base policy); "
                        "required for eval sets without references such as 'builtin'")
    p.add_argument("--judge", default="length", help=f"a registered judge's spec: {judge_syntaxes()}")
    p.add_argument("--judge-arg", action="append", default=[],
                   help="keyword argument k=v of the judge's factory, over the spec's (repeatable)")
    p.add_argument("--cache", default=None, help="SQLite judgement cache (default $SPI_CACHE_DIR/judgements.sqlite)")
    p.add_argument("--out", default=None, help="write {index, preference} JSONL here")
    _subset_args(p)
    p.set_defaults(func=cmd_judge)


def _load_eval(args):
    """(full eval set, the indices chosen by --n/--stratify)."""
    from .data import load_eval_set, subset

    eval_set = load_eval_set(args.eval_set)
    chosen = subset(eval_set, getattr(args, "n", None), stratify=getattr(args, "stratify", False))
    return eval_set, [e["index"] for e in chosen]


def cmd_leaderboard(args) -> int:
    from .leaderboard import compare_with_published, compute_leaderboard, format_table, write_leaderboard

    eval_set, indices = _load_eval(args)
    weights = args.glm_weights
    if weights is None:
        candidate = Path(args.preferences).resolve().parent / "glm_weights_length_controlled_v1.csv"
        weights = candidate if candidate.is_file() else None
    board = compute_leaderboard(eval_set, args.outputs, args.preferences, gamed_weights_path=weights,
                                use_difficulty=not args.no_difficulty, indices=indices)
    write_leaderboard(board, args.out)
    print(format_table(board))
    print(f"regularised toward gamed baselines: {'yes (' + str(weights) + ')' if any(r['regularized'] for r in board.values()) else 'no'}")
    if args.compare:
        cmp = compare_with_published(board, args.compare)
        print(f"vs {args.compare}: {cmp['n_models']} models, LC MAE {cmp['lc_mae']:.3f}, LC max error "
              f"{cmp['lc_max_error']:.3f}, LC Spearman {cmp['lc_spearman']:.4f}, raw max error {cmp['raw_max_error']:.2e}")
    return 0


def cmd_train_judge(args) -> int:
    from .trained_judge import default_embed_cache, train_judge

    eval_set, indices = _load_eval(args)
    judge = train_judge(eval_set, args.outputs, args.preferences, args.out, backbone=args.backbone,
                        indices=indices, max_tokens=args.max_tokens,
                        embed_cache_dir=default_embed_cache())
    print(f"saved {judge.identity} to {args.out} (C={judge.meta['C']}, {judge.meta['n_pairs']} pairs)")
    return 0


def cmd_judge_agreement(args) -> int:
    from .trained_judge import default_embed_cache, format_agreement, judge_agreement

    eval_set, indices = _load_eval(args)
    result = judge_agreement(eval_set, args.outputs, args.preferences, backbone=args.backbone,
                             indices=indices, test_fraction=args.test_fraction,
                             seed=args.seed, max_tokens=args.max_tokens, embed_cache_dir=default_embed_cache())
    print(format_agreement(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _parse_kwargs(pairs):
    kwargs = {}
    for item in pairs:
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def cmd_judge(args) -> int:
    import os

    from .data import read_model_outputs
    from .judges import JudgeSpecError, resolve_judge
    from .judging import JudgementCache, judge_pairs
    from .metrics import win_rate_metrics

    eval_set, indices = _load_eval(args)
    outputs = read_model_outputs(args.outputs, eval_set)
    chosen = set(indices)
    outputs = {i: o for i, o in outputs.items() if i in chosen}
    try:
        judge = resolve_judge(args.judge, **_parse_kwargs(args.judge_arg))
    except JudgeSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cache_path = args.cache or Path(os.environ.get("SPI_CACHE_DIR") or Path.home() / ".cache" / "spi") / "judgements.sqlite"
    if args.references:
        refs = read_model_outputs(args.references, eval_set)
        eval_set = [{**e, "reference_output": refs[e["index"]]["output"],
                     "reference_generator": refs[e["index"]]["generator"]} for e in eval_set if e["index"] in refs]
    rows = [e for e in eval_set if e["index"] in outputs]
    missing = [e["index"] for e in rows if not e["reference_output"]]
    if missing:
        raise ValueError(f"--eval-set {args.eval_set}: no reference output for instructions {missing[:5]}: "
                         "pass --references")
    prefs = judge_pairs(judge, [e["instruction"] for e in rows], [outputs[e["index"]]["output"] for e in rows],
                        [e["reference_output"] for e in rows], cache=JudgementCache(cache_path))
    if args.out:
        Path(args.out).write_text("".join(json.dumps({"index": e["index"], "preference": p}) + "\n" for e, p in zip(rows, prefs, strict=False)))
    m = win_rate_metrics(prefs)
    print(f"judge {judge.identity}: win rate {m['win_rate']:.2f} +- {m['standard_error']:.2f} over {m['n_total']} instructions")
    return 0


def add_ifeval_command(subparsers) -> None:
    p = subparsers.add_parser("ifeval", help="IFEval's strict/loose accuracies of {prompt, response} lines")
    p.add_argument("--prompts", required=True, help="JSONL in IFEval's schema: key, prompt, instruction_id_list, kwargs")
    p.add_argument("--responses", required=True, help="JSONL of {prompt, response} lines")
    p.add_argument("--out", required=True, help="JSON file: the four accuracies (percent), intervals, per-kind figures")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offline-only", action="store_true",
                   help="skip prompts with a constraint kind that cannot be checked offline (else: an error)")
    p.set_defaults(func=cmd_ifeval)


def cmd_ifeval(args) -> int:
    from .ifeval import METRICS, score_files

    result = score_files(args.prompts, args.responses, n_boot=args.n_boot, seed=args.seed,
                         offline_only=args.offline_only)  # bad input: ValueError/OSError naming file and row
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(", ".join(f"{m} {result[m]:.2f}" for m in METRICS) + f" over {result['n_prompts']} prompts")
    return 0


def add_commands(subparsers) -> None:
    """Mount the evaluation subcommands under ``spi eval``."""
    parser = subparsers.add_parser("eval", help="AlpacaEval 2.0 scoring, judges and leaderboards")
    add_eval_commands(parser.add_subparsers(dest="eval_command", required=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="spi eval", description=__doc__.splitlines()[0])
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # bad input (files, rows, constraints, specs): one line, as `spi` prints
        print("error: " + (" ".join(str(err).split()) or type(err).__name__), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
