"""Judge specs of a recipe (``evaluation.judge``) and the scoring of one system's outputs.

A recipe names its judge with a short spec; this module turns the spec into an
``evaluation.judges`` judge and scores outputs with it (no Prefect here; flows/tasks.py wraps it).

    length | length:SCALE          length-only baseline (the dummy for tests)
    local:NAME                    a trained Bradley-Terry judge: NAME is a folder, or a judge
                                  saved under $SPI_CACHE_DIR/judges/NAME (``minilm-bt`` is trained
                                  there on first use when the AlpacaEval preference data is present)
    trained:FOLDER                a judge folder written by evaluation.trained_judge
    reward | reward:KIND:MODEL    a reward model as judge (``reward`` alone = the recipe's reward
                                  model, refused unless allowed: it would grade its own homework)
    llm | llm:MODEL               a local causal LM as pairwise judge
    alpaca_eval:CONFIG            the official API annotators (needs OPENAI_API_KEY)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from pathlib import Path

from evaluation.judges import JudgementCache, judge_pairs

log = logging.getLogger("flows.judging")

DEFAULT_LOCAL_JUDGE = "minilm-bt"
LOCAL_JUDGE_INSTRUCTIONS = 100  # AlpacaEval instructions (x ~37 models) the auto-trained judge sees


class JudgeSpecError(ValueError):
    """A judge spec that cannot be resolved; the message says what to do."""


def judges_dir() -> Path:
    root = os.environ.get("SPI_CACHE_DIR") or Path.home() / ".cache" / "spi"
    return Path(root) / "judges"


def split_spec(spec: str) -> tuple[str, str]:
    name, _, arg = str(spec).partition(":")
    return name.strip(), arg.strip()


def _folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def local_judge_folder(name: str) -> Path:
    """Folder of a ``local:NAME`` / ``trained:FOLDER`` judge (may not exist yet)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    return judges_dir() / name


def judge_fingerprint(spec: str, reward_config: dict | None = None) -> str:
    """What identifies the judge's answers, computed without loading it (for cache keys)."""
    name, arg = split_spec(spec)
    if name in ("local", "trained"):
        folder = local_judge_folder(arg or DEFAULT_LOCAL_JUDGE)
        return f"{spec}@{_folder_fingerprint(folder) if folder.is_dir() else 'untrained'}"
    if name == "reward" and not arg:
        return f"reward@{json.dumps(reward_config, sort_keys=True)}"
    return spec


def check_independent(spec: str, reward_config: dict, allow_same: bool = False) -> None:
    """Refuse a judge that is the recipe's reward model (the experiment optimised against it)."""
    if allow_same:
        return
    name, arg = split_spec(spec)
    same = False
    if name == "reward":
        kind, _, model = arg.partition(":")
        same = not arg or (kind == reward_config.get("kind") and model == reward_config.get("model"))
    elif name == "llm":
        same = reward_config.get("kind") == "llm-judge" and (
            arg or "smollm2-135m-instruct"
        ) == reward_config.get("model")
    if same:
        raise JudgeSpecError(
            f"evaluation.judge '{spec}' is the reward model the experiment was trained on "
            f"({reward_config.get('kind')}:{reward_config.get('model')}); pick another judge "
            "(e.g. local:minilm-bt or length) or allow it explicitly and report it"
        )


def check_judge_available(spec: str) -> None:
    """Fail early (before any model loads) when a judge can be neither loaded nor trained."""
    name, arg = split_spec(spec)
    known = ("length", "local", "trained", "reward", "llm", "alpaca_eval")
    if name not in known:
        raise JudgeSpecError(f"unknown judge '{spec}': use one of {', '.join(known)} (see flows/judging.py)")
    if name == "trained" and not (Path(arg).expanduser() / "judge_head.json").is_file():
        raise JudgeSpecError(f"judge '{spec}': {arg or '(empty)'} is not a trained judge folder")
    if (
        name == "local"
        and not (local_judge_folder(arg or DEFAULT_LOCAL_JUDGE) / "judge_head.json").is_file()
    ):
        from evaluation.leaderboard import default_data_dir

        data = default_data_dir()
        if not (data / "eval_set.jsonl").is_file() or not (data / "preferences").is_dir():
            raise JudgeSpecError(
                f"judge '{spec}' is not trained ({local_judge_folder(arg or DEFAULT_LOCAL_JUDGE)} has no "
                f"judge_head.json) and no AlpacaEval preference data is at {data} (set SPI_ALPACA_DATA); "
                "train it with the fit-local-judge flow, or set evaluation.judge=length"
            )


def ensure_local_judge(
    name: str = DEFAULT_LOCAL_JUDGE,
    data_dir: str | os.PathLike | None = None,
    n_instructions: int | None = LOCAL_JUDGE_INSTRUCTIONS,
    backbone: str = "minilm-l6",
    out: str | os.PathLike | None = None,
) -> Path:
    """The folder of local judge ``name``; trains it from AlpacaEval preference data if absent."""
    folder = Path(out) if out else local_judge_folder(name)
    if (folder / "judge_head.json").is_file():
        return folder
    from evaluation.data import load_eval_set, subset
    from evaluation.leaderboard import default_data_dir
    from evaluation.trained_judge import default_embed_cache, train_judge

    data = Path(data_dir) if data_dir else default_data_dir()
    if not (data / "eval_set.jsonl").is_file() or not (data / "preferences").is_dir():
        raise JudgeSpecError(
            f"judge '{name}' is not trained ({folder} has no judge_head.json) and no AlpacaEval preference "
            f"data is at {data} (set SPI_ALPACA_DATA); train it with the fit-local-judge flow, or set "
            "evaluation.judge=length"
        )
    eval_set = load_eval_set(data / "eval_set.jsonl")
    indices = [e["index"] for e in subset(eval_set, n_instructions)]
    log.info("training local judge %s on %s (%d instructions)", name, data, len(indices))
    tmp = folder.with_name(folder.name + ".partial")
    judge = train_judge(
        eval_set,
        data / "outputs",
        data / "preferences",
        tmp,
        backbone=backbone,
        indices=indices,
        embed_cache_dir=default_embed_cache(),
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log.info("local judge %s: %s, %d pairs, saved to %s", name, judge.identity, judge.meta["n_pairs"], folder)
    return folder


def resolve_judge(spec: str, reward_config: dict | None = None):
    """An ``evaluation.judges`` judge for ``spec`` (see the module docstring)."""
    from evaluation.judges import make_judge

    name, arg = split_spec(spec)
    if name == "length":
        return make_judge("length", **({"scale": float(arg)} if arg else {}))
    if name == "local":
        folder = ensure_local_judge(arg or DEFAULT_LOCAL_JUDGE)
        from evaluation.trained_judge import default_embed_cache

        return make_judge("trained", path=str(folder), embed_cache_dir=default_embed_cache())
    if name == "trained":
        if not arg or not Path(arg).expanduser().is_dir():
            raise JudgeSpecError(f"judge '{spec}': trained:FOLDER needs an existing judge folder")
        return make_judge("trained", path=str(Path(arg).expanduser()))
    if name == "reward":
        from spi.config import RewardConfig

        if arg:
            kind, _, model = arg.partition(":")
            config = RewardConfig(kind=kind, model=model)
        else:
            config = RewardConfig(**(reward_config or {}))
        return make_judge("reward", config=config)
    if name == "llm":
        return make_judge("llm", **({"model": arg} if arg else {}))
    if name == "alpaca_eval":
        return make_judge("alpaca_eval", **({"annotators_config": arg} if arg else {}))
    raise JudgeSpecError(
        f"unknown judge '{spec}': use length, local:NAME, trained:FOLDER, reward[:KIND:MODEL], "
        "llm[:MODEL] or alpaca_eval[:CONFIG]"
    )


def judge_rows(judge, eval_rows: list[dict], outputs: list[dict], cache=None) -> list[dict]:
    """One annotation per row, {index, instruction, output, reference, preference}: the judge's
    preference for ``outputs[i]`` over the reference of ``eval_rows[i]`` (asked only where ``cache``,
    an ``evaluation.judges.JudgementCache`` or None, lacks it)."""
    if [o["instruction"] for o in outputs] != [e["instruction"] for e in eval_rows]:
        raise ValueError("outputs do not answer the eval set's instructions in order")
    instructions = [e["instruction"] for e in eval_rows]
    references = [e["reference_output"] for e in eval_rows]
    answers = [o["output"] for o in outputs]
    prefs = judge_pairs(judge, instructions, answers, references, cache=cache)
    return [
        {"index": e["index"], "instruction": e["instruction"], "output": a, "reference": r, "preference": p}
        for e, a, r, p in zip(eval_rows, answers, references, prefs, strict=True)
    ]


def annotation_metrics(annotations: list[dict], n_boot: int = 2000) -> dict:
    """Metrics of all of a system's annotations: win_rate (+ standard error, bootstrap CI), discrete win
    rate, the LC win rate where it can be fitted (None otherwise), avg_length."""
    from evaluation.metrics import win_rate_ci, win_rate_metrics

    prefs = [a["preference"] for a in annotations]
    answers = [a["output"] for a in annotations]
    metrics = win_rate_metrics(prefs)
    if len(prefs) >= 2:
        _, low, high = win_rate_ci(prefs, n_boot=n_boot)
        metrics.update(win_rate_ci_low=low, win_rate_ci_high=high)
    metrics["length_controlled_winrate"] = metrics["lc_standard_error"] = None
    try:
        from evaluation.length_control import length_controlled_win_rate

        idx = [a["index"] for a in annotations]
        lc = length_controlled_win_rate(
            dict(zip(idx, prefs, strict=True)),
            dict(zip(idx, answers, strict=True)),
            dict(zip(idx, [a["reference"] for a in annotations], strict=True)),
            n_splits=min(5, len(prefs)),
        )
        metrics["length_controlled_winrate"] = lc["length_controlled_winrate"]
        metrics["lc_standard_error"] = lc["lc_standard_error"]
    except Exception as err:  # too few or degenerate preferences: the LC GLM cannot be fitted
        log.info("length-controlled win rate not computable: %s", err)
    metrics["avg_length"] = sum(len(a) for a in answers) / max(len(answers), 1)
    return metrics


def judge_payload(system: str, identity: str, spec: str, reward: dict, annotations: list[dict]) -> dict:
    """The judge stage's file: who judged, the metrics of all annotations, the annotations."""
    return {
        "system": system,
        "judge": identity,
        "judge_spec": spec,
        "reward_model": f"{reward.get('kind')}:{reward.get('model')}",
        "metrics": annotation_metrics(annotations),
        "annotations": annotations,
    }


class ShardJudgementCache(JudgementCache):
    """The judge cache as a shard task sees it: reads the SQLite cache read-only, keeps nothing it
    judges (the annotations carry the preferences). Only the flow process writes the SQLite file, after
    the merge (:func:`store_judgements`), so shard tasks on many workers never write it at once; this
    holds on a shared network filesystem too, where SQLite's file locks (and WAL's shared memory, which
    needs one host) cannot be trusted."""

    def __init__(self, path: str | os.PathLike):  # no mkdir, no CREATE TABLE: nothing written
        self.path, self._lock = Path(path), threading.Lock()

    def _connect(self):
        return sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=30)

    def get_many(self, keys) -> dict[str, float]:
        try:
            return super().get_many(keys)
        except sqlite3.Error:  # no cache yet, or locked past the timeout: judge those pairs afresh
            return {}

    def put_many(self, identity: str, items: dict[str, float]) -> None:
        pass


def store_judgements(path: str | os.PathLike, identity: str, annotations: list[dict]) -> None:
    """Write annotations' preferences into the SQLite judge cache (one writer: the flow process)."""
    JudgementCache(path).put_many(
        identity,
        {
            JudgementCache.key(identity, a["instruction"], a["reference"], a["output"]): a["preference"]
            for a in annotations
        },
    )
