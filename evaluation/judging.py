"""Judging outputs: the judgement cache, judge_pairs, one system's annotations and metrics, and the
local judge's folder (shipped with the package for the default, else trained on first use).

Which judges exist, how a spec is parsed and checked, and what identifies a judge's answers is the
registry's business (evaluation/judges.py); this module scores with a judge it is given. No Prefect
here: flows/tasks.py and flows/sharded.py wrap these functions in tasks.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from evaluation.judges import DEFAULT_LOCAL_JUDGE, Judge, JudgeSpecError, digest_parts
from spi.stagefiles import write_folder

log = logging.getLogger("evaluation.judging")

LOCAL_JUDGE_INSTRUCTIONS = 100  # AlpacaEval instructions (x ~37 models) the auto-trained minilm-bt sees
# How each named Bradley-Terry local judge is trained when absent (a name not listed: minilm-bt's settings).
# text-bt needs no backbone, so it trains on every instruction in seconds; its offsets per AlpacaEval
# instruction apply only where the reference is the one it was trained against.
LOCAL_JUDGE_SETTINGS = {
    "minilm-bt": {"backbone": "minilm-l6", "text_features": False, "instruction_offsets": False,
                  "n_instructions": LOCAL_JUDGE_INSTRUCTIONS},
    "text-bt": {"backbone": None, "text_features": True, "instruction_offsets": True, "n_instructions": None},
}
EMBEDDED_JUDGES = Path(__file__).resolve().parent / "judges_data"  # package data: trained heads
HEAD_FILE = "judge_head.json"
CROSS_ENCODER_JUDGES = {"minilm-ce"}  # local names of fine-tuned cross-encoders: never trained on first use


class JudgementCache:
    """SQLite cache of preferences keyed by (judge identity, instruction, reference, output)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, judge TEXT, preference REAL)")

    def _connect(self):
        return sqlite3.connect(self.path, timeout=30)

    @staticmethod
    def key(identity: str, instruction: str, reference: str, output: str) -> str:
        return digest_parts(identity, instruction, reference, output)

    def get_many(self, keys: Sequence[str]) -> dict[str, float]:
        found = {}
        with self._lock, self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT key, preference FROM judgements WHERE key IN ({marks})", chunk))
        return found

    def put_many(self, identity: str, items: dict[str, float]) -> None:
        with self._lock, self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO judgements (key, judge, preference) VALUES (?, ?, ?)",
                [(k, identity, float(v)) for k, v in items.items()],
            )

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]


def judge_pairs(
    judge: Judge,
    instructions: Sequence[str],
    outputs: Sequence[str],
    references: Sequence[str],
    *,
    cache: JudgementCache | None = None,
    batch_size: int = 16,
) -> list[float]:
    """Judge every (instruction, output, reference), asking the judge only for what the cache lacks.

    Each batch is written to the cache as soon as it is judged, so a failure in a later batch keeps
    the earlier judgements. Returned preferences are checked to lie in [1, 2].
    """
    if not (len(instructions) == len(outputs) == len(references)):
        raise ValueError("instructions, outputs and references must have the same length")
    keys = [JudgementCache.key(judge.identity, i, r, o) for i, o, r in zip(instructions, outputs, references, strict=False)]
    known = cache.get_many(keys) if cache is not None else {}
    todo = [n for n, k in enumerate(keys) if k not in known]
    todo = list(dict.fromkeys(todo))
    for start in range(0, len(todo), batch_size):
        rows = todo[start:start + batch_size]
        prefs = judge.judge([instructions[n] for n in rows], [outputs[n] for n in rows], [references[n] for n in rows])
        if len(prefs) != len(rows):
            raise RuntimeError(f"judge {judge.identity} returned {len(prefs)} preferences for {len(rows)} pairs")
        new = {}
        for n, p in zip(rows, prefs, strict=False):
            p = float(p)
            if not (math.isfinite(p) and 1.0 <= p <= 2.0):
                raise ValueError(f"judge {judge.identity} returned preference {p} outside [1, 2]")
            new[keys[n]] = p
        if cache is not None:
            cache.put_many(judge.identity, new)
        known.update(new)
    return [known[k] for k in keys]


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


# ----------------------------------------------------------------------------- the local judge
def judges_dir() -> Path:
    root = os.environ.get("SPI_CACHE_DIR") or Path.home() / ".cache" / "spi"
    return Path(root) / "judges"


def embedded_judge_folder(name: str) -> Path:
    """Where the package ships the trained head of local judge ``name`` (evaluation/judges_data/NAME):
    the head and its metadata, a few KB; the backbone's weights come from their own package."""
    return EMBEDDED_JUDGES / name


def local_judge_folder(name: str) -> Path:
    """Folder of the ``local:NAME`` judge, the first of: NAME itself when it is a folder; a judge trained
    under $SPI_CACHE_DIR/judges/NAME (the fit-local-judge flow writes there); the judge the package ships
    (evaluation/judges_data/NAME, so ``local:text-bt`` and ``local:minilm-bt`` need no data and no
    training); else the cache folder, where it would be trained."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    trained = judges_dir() / name
    embedded = embedded_judge_folder(name)
    if not (trained / HEAD_FILE).is_file() and (embedded / HEAD_FILE).is_file():
        return embedded
    return trained


def local_judge_data(name: str, folder: Path, data_dir: str | os.PathLike | None = None) -> Path:
    """The AlpacaEval data the untrained local judge ``name`` would be trained on (default: the folder of
    SPI_ALPACA_DATA); an error that says what to do when it is not there."""
    from evaluation.leaderboard import alpaca_data_dir

    data = Path(data_dir) if data_dir else alpaca_data_dir()
    if data is None or not (data / "eval_set.jsonl").is_file() or not (data / "preferences").is_dir():
        raise JudgeSpecError(
            f"judge 'local:{name}' is not trained ({folder} has no judge_head.json) and no AlpacaEval "
            f"preference data is at {data} (set SPI_ALPACA_DATA); train it with the fit-local-judge flow, "
            "or set evaluation.judge=length"
        )
    return data


def check_local_judge(name: str) -> None:
    """Fail, loading nothing, when local judge ``name`` is neither trained nor trainable here."""
    folder = local_judge_folder(name)
    if (folder / HEAD_FILE).is_file():
        return
    if name in CROSS_ENCODER_JUDGES:
        raise JudgeSpecError(
            f"judge 'local:{name}' is not trained ({folder} has no judge_head.json); fine-tuning it takes about "
            f"an hour: spi eval train-judge --kind cross-encoder --eval-set ... --outputs ... --preferences ... "
            f"--out {folder}"
        )
    local_judge_data(name, folder)


def ensure_local_judge(
    name: str = DEFAULT_LOCAL_JUDGE,
    data_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    **settings,
) -> Path:
    """The folder of local judge ``name``; trains it from AlpacaEval preference data if absent, with
    LOCAL_JUDGE_SETTINGS[name] (``backbone``, ``text_features``, ``instruction_offsets``,
    ``n_instructions``: None = all) updated by ``settings``."""
    folder = Path(out) if out else local_judge_folder(name)
    if (folder / HEAD_FILE).is_file():
        return folder
    if name in CROSS_ENCODER_JUDGES:
        check_local_judge(name)  # says how to train it: a cross-encoder is not trained on first use
    data = local_judge_data(name, folder, data_dir)
    from evaluation.data import load_eval_set, subset
    from evaluation.trained_judge import default_embed_cache, train_judge

    unknown = set(settings) - {"backbone", "text_features", "instruction_offsets", "n_instructions"}
    if unknown:
        raise TypeError(f"ensure_local_judge: unknown settings {sorted(unknown)}")
    settings = {**LOCAL_JUDGE_SETTINGS.get(name, LOCAL_JUDGE_SETTINGS["minilm-bt"]), **settings}
    eval_set = load_eval_set(data / "eval_set.jsonl")
    indices = [e["index"] for e in subset(eval_set, settings["n_instructions"])]
    log.info("training local judge %s on %s (%d instructions)", name, data, len(indices))
    judge = None

    def build(tmp: Path) -> None:
        nonlocal judge
        judge = train_judge(
            eval_set,
            data / "outputs",
            data / "preferences",
            tmp,
            backbone=settings["backbone"],
            text_features=settings["text_features"],
            instruction_offsets=settings["instruction_offsets"],
            indices=indices,
            embed_cache_dir=default_embed_cache(),
        )

    write_folder(folder, build)
    log.info("local judge %s: %s, %d pairs, saved to %s", name, judge.identity, judge.meta["n_pairs"], folder)
    return folder


# ----------------------------------------------------------------------------- one system's annotations
def judge_rows(judge, eval_rows: list[dict], outputs: list[dict], cache=None) -> list[dict]:
    """One annotation per row, {index, instruction, output, reference, preference}: the judge's
    preference for ``outputs[i]`` over the reference of ``eval_rows[i]`` (asked only where ``cache``,
    a :class:`JudgementCache` or None, lacks it)."""
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
    rate, the LC win rate, avg_length. A metric that cannot be estimated from this sample (an interval
    below MIN_BOOTSTRAP_INSTRUCTIONS, LC below MIN_LC_INSTRUCTIONS or without a converged GLM) is None,
    and ``not_available`` maps its name to the reason; tables print "n/a"."""
    from evaluation.length_control import length_controlled_win_rate
    from evaluation.metrics import NotEstimable, win_rate_ci, win_rate_metrics

    prefs = [a["preference"] for a in annotations]
    answers = [a["output"] for a in annotations]
    metrics = win_rate_metrics(prefs)
    metrics.update(win_rate_ci_low=None, win_rate_ci_high=None, length_controlled_winrate=None,
                   lc_standard_error=None)
    missing = {}
    try:
        _, metrics["win_rate_ci_low"], metrics["win_rate_ci_high"] = win_rate_ci(prefs, n_boot=n_boot)
    except NotEstimable as err:
        missing["win_rate_ci"] = str(err)
    if not math.isfinite(metrics["standard_error"]):
        metrics["standard_error"] = metrics["discrete_standard_error"] = None
        missing["standard_error"] = f"a standard error needs at least 2 instructions, got {len(prefs)}"
    idx = [a["index"] for a in annotations]
    try:
        lc = length_controlled_win_rate(
            dict(zip(idx, prefs, strict=True)),
            dict(zip(idx, answers, strict=True)),
            dict(zip(idx, [a["reference"] for a in annotations], strict=True)),
        )
        metrics["length_controlled_winrate"] = lc["length_controlled_winrate"]
        metrics["lc_standard_error"] = lc["lc_standard_error"]
    except NotEstimable as err:
        missing["length_controlled_winrate"] = str(err)
    for key, reason in missing.items():
        log.info("%s not available: %s", key, reason)
    metrics["not_available"] = missing
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


