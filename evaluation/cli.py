"""``spi eval ...`` subcommands (mounted by flows/cli.py through :func:`add_eval_commands`).

    spi eval leaderboard --eval-set FILE --outputs DIR --preferences DIR --out FILE.json
    spi eval train-judge --eval-set FILE --outputs DIR --preferences DIR --out DIR [--backbone minilm-l6]
    spi eval train-judge ... --kind cross-encoder --train-split --out DIR
    spi eval judge-agreement --eval-set FILE --outputs DIR --preferences DIR [--backbone minilm-l6]
    spi eval judge-agreement --judge [NAME] --eval-set FILE --outputs DIR --preferences DIR [--held-out [both|models|instructions]] --json F
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
    p.add_argument("--instruction-difficulty", default=None, metavar="CSV",
                   help="alpaca_eval's instruction_difficulty.csv (the hub file the official LC uses), instead of "
                        "estimating the difficulty by a joint fit over the given preference files")
    p.add_argument("--compare", default=None, help="a published leaderboard CSV to print MAE / Spearman against")
    _subset_args(p)
    p.set_defaults(func=cmd_leaderboard)

    p = subparsers.add_parser("train-judge", help="train a judge on preference files")
    _common(p)
    p.add_argument("--out", required=True, help="folder for the judge (head + checksum)")
    p.add_argument("--kind", choices=("bradley-terry", "cross-encoder"), default="bradley-terry",
                   help="bradley-terry: a head on frozen embeddings (minutes); cross-encoder: the encoder "
                        "fine-tuned end to end (about an hour on 2 cores; resumable, see --max-minutes)")
    _feature_args(p)
    p.add_argument("--max-tokens", type=int, default=None, help="default 128 (bradley-terry), 256 (cross-encoder)")
    p.add_argument("--train-split", nargs="?", const="both", default=None, choices=("both", "models"),
                   help="train only on the training group of judge-agreement's split (--test-fraction, --seed): "
                        "both (alone) = the training models x the training instructions, so that judge-agreement "
                        "--held-out measures it on models and instructions it never saw; models = the training "
                        "models on every instruction (for --held-out models)")
    p.add_argument("--instruction-offsets", action="store_true",
                   help="bradley-terry: learn an offset per (instruction, reference) seen in training (how hard "
                        "that reference is to beat); applied only to the same instruction and reference")
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="cross-encoder: optimisation steps")
    p.add_argument("--checkpoint-every", type=int, default=None, help="cross-encoder: steps between checkpoints")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="cross-encoder: stop at a checkpoint after this long (run again to resume)")
    _subset_args(p)
    p.set_defaults(func=cmd_train_judge)

    p = subparsers.add_parser(
        "judge-agreement", help="agreement with the preferences: of a trained judge (--judge), or of a judge "
                                "trained here on some models+instructions and tested on the others")
    _common(p)
    p.add_argument("--judge", nargs="?", const="", default=None, metavar="NAME",
                   help="evaluate this already-trained judge spec (alone: the recipes' default judge) on all "
                        "given models and instructions, beside length-only and the recipes' default judge; "
                        "without --judge: train a Bradley-Terry judge (--backbone) on a split and test it")
    p.add_argument("--judge-arg", action="append", default=[], help="k=v keyword argument of --judge's factory")
    p.add_argument("--held-out", nargs="?", const="both", default=None, choices=("both", "models", "instructions"),
                   help="with --judge, for a judge trained with train-judge --train-split (same --test-fraction, "
                        "--seed): both (alone) = the held-out models x the held-out instructions; models = the "
                        "held-out models on every instruction; instructions = every model on the held-out instructions")
    p.add_argument("--no-current", action="store_true", help="with --judge: skip the recipes' default judge")
    p.add_argument("--n-boot", type=int, default=200, help="with --judge: bootstrap resamples for the intervals")
    p.add_argument("--cache", default=None, help="with --judge: SQLite judgement cache (default: none)")
    _feature_args(p)
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


def _feature_args(p) -> None:
    p.add_argument("--backbone", default="minilm-l6", help="frozen embedding backbone; 'none' for no embeddings")
    p.add_argument("--text-features", action="store_true",
                   help="bradley-terry: add the answers' text statistics (evaluation/text_features.py); "
                        "with --backbone none this is how local:text-bt is trained")


def _backbone(args) -> str | None:
    return None if args.backbone.lower() == "none" else args.backbone


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
                                use_difficulty=not args.no_difficulty, indices=indices,
                                difficulty_path=args.instruction_difficulty)
    write_leaderboard(board, args.out)
    print(format_table(board))
    print(f"regularised toward gamed baselines: {'yes (' + str(weights) + ')' if any(r['regularized'] for r in board.values()) else 'no'}")
    if args.compare:
        cmp = compare_with_published(board, args.compare)
        print(f"vs {args.compare}: {cmp['n_models']} models, LC MAE {cmp['lc_mae']:.3f}, LC max error "
              f"{cmp['lc_max_error']:.3f}, LC Spearman {cmp['lc_spearman']:.4f}, raw max error {cmp['raw_max_error']:.2e}")
    return 0


def _split_groups(args, eval_set, indices):
    """(models, indices) to use: all, or the training / held-out group of judge-agreement's split."""
    from .trained_judge import collect_pairs, split_models_and_instructions

    held_out, train_split = getattr(args, "held_out", None), getattr(args, "train_split", None)
    if train_split is None and held_out is None:
        return None, indices
    pairs = collect_pairs(eval_set, args.outputs, args.preferences, indices=indices)
    train_m, test_m, train_i, test_i = split_models_and_instructions(
        sorted({m for m, *_ in pairs}), sorted({i for _, i, _, _ in pairs}), test_fraction=args.test_fraction,
        seed=args.seed)
    if train_split is not None:
        return train_m, (train_i if train_split == "both" else indices)
    models = test_m if held_out in ("both", "models") else None
    return models, (test_i if held_out in ("both", "instructions") else indices)


def cmd_train_judge(args) -> int:
    import dataclasses

    from .cross_encoder import CrossEncoderConfig, train_cross_encoder
    from .trained_judge import default_embed_cache, train_judge

    if args.kind == "cross-encoder" and (args.text_features or args.instruction_offsets):
        raise ValueError("--text-features and --instruction-offsets are options of --kind bradley-terry, "
                         "not of the cross-encoder")
    eval_set, indices = _load_eval(args)
    models, indices = _split_groups(args, eval_set, indices)
    if args.kind == "cross-encoder":
        given = {"backbone": args.backbone, "max_tokens": args.max_tokens, "steps": args.steps,
                 "checkpoint_every": args.checkpoint_every}
        config = dataclasses.replace(CrossEncoderConfig(), **{k: v for k, v in given.items() if v is not None})
        done = train_cross_encoder(eval_set, args.outputs, args.preferences, args.out, config=config, models=models,
                                   indices=indices, max_minutes=args.max_minutes)
        print(f"saved the cross-encoder judge to {done}" if done else
              f"stopped after {args.max_minutes} minutes at a checkpoint; run the same command again to resume")
        return 0
    judge = train_judge(eval_set, args.outputs, args.preferences, args.out, backbone=_backbone(args), models=models,
                        indices=indices, max_tokens=args.max_tokens or 128, embed_cache_dir=default_embed_cache(),
                        text_features=args.text_features, instruction_offsets=args.instruction_offsets)
    print(f"saved {judge.identity} to {args.out} (C={judge.meta['C']}, {judge.meta['n_pairs']} pairs)")
    return 0


def cmd_judge_agreement(args) -> int:
    from .trained_judge import default_embed_cache, format_agreement, judge_agreement

    if args.judge is not None:
        return _agreement_of_trained_judge(args)
    eval_set, indices = _load_eval(args)
    result = judge_agreement(eval_set, args.outputs, args.preferences, backbone=_backbone(args),
                             indices=indices, test_fraction=args.test_fraction, seed=args.seed,
                             max_tokens=args.max_tokens, embed_cache_dir=default_embed_cache(),
                             text_features=args.text_features)
    print(format_agreement(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _agreement_of_trained_judge(args) -> int:
    from .agreement import default_judge_spec, evaluate_judges, format_judges
    from .judges import JudgeSpecError
    from .judging import JudgementCache

    eval_set, indices = _load_eval(args)
    models, indices = _split_groups(args, eval_set, indices)
    spec, current = args.judge or default_judge_spec(), default_judge_spec()
    specs = [spec] if args.no_current or current == spec else [spec, current]
    try:
        result = evaluate_judges(specs, eval_set, args.outputs, args.preferences, models=models, indices=indices,
                                 cache=JudgementCache(args.cache) if args.cache else None, n_boot=args.n_boot,
                                 seed=args.seed, judge_kwargs=_parse_kwargs(args.judge_arg))
    except JudgeSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_judges(result))
    if args.json:
        ours = result["judges"][spec]
        baselines = {"length_only": result["length_only"], **{k: v for k, v in result["judges"].items() if k != spec}}
        payload = {"judge": spec, **ours, "held_out": args.held_out or False, "baselines": baselines}
        Path(args.json).write_text(json.dumps(payload, indent=1))
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
