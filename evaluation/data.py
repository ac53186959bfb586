"""Eval sets, reference outputs and model outputs in AlpacaEval's formats.

An eval set is a list of dicts with keys ``index`` (0-based position in the official set, or in the
built-in set), ``instruction``, ``dataset``, ``reference_output`` and ``reference_generator``.
Accepted inputs:
- AlpacaEval's ``eval_set.jsonl`` in its published layout (one JSON object per line, ``reference_output``);
- AlpacaEval's own JSON (a list of ``{instruction, output, generator, dataset}``), where ``output`` is
  the reference;
- a folder holding one of those (``eval_set.jsonl``, ``alpaca_eval.json`` or ``alpaca_eval_gpt4_baseline.json``);
- ``"builtin"``: the ~40 instructions of ``builtin_eval.jsonl`` written for this project (no references:
  produce them with :func:`attach_references`);
- ``"hub"``: the official set from the Hugging Face hub, only when it is reachable.

Every row problem raises :class:`DataError` naming the file and the 1-based row (line for JSONL,
list position for JSON).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

BUILTIN_EVAL = Path(__file__).parent / "builtin_eval.jsonl"
FOLDER_CANDIDATES = ("eval_set.jsonl", "alpaca_eval.json", "alpaca_eval_gpt4_baseline.json", "eval_set.json")


class DataError(ValueError):
    """Bad input data; the message names the file and the 1-based row."""

    def __init__(self, path, row: int | None, message: str):
        self.path, self.row = str(path), row
        where = f"{path}, row {row}" if row is not None else str(path)
        super().__init__(f"{where}: {message}")


# ----------------------------------------------------------------------------- raw readers
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(row number, object) pairs from a JSONL(.gz) file or a JSON list; rows are 1-based."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "no such file")
    try:
        with _open_text(path) as fh:
            text = fh.read()
    except (OSError, EOFError, UnicodeDecodeError) as err:  # not gzip, truncated, not UTF-8
        raise DataError(path, None, f"cannot be read ({type(err).__name__}: {err})") from None
    name = path.name.removesuffix(".gz")
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, None, f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        if not isinstance(data, list):
            raise DataError(path, None, "expected a JSON list of objects")
        rows = list(enumerate(data, start=1))
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(path, lineno, f"invalid JSON at column {err.colno}: {err.msg}") from None
    for row, obj in rows:
        if not isinstance(obj, dict):
            raise DataError(path, row, f"expected a JSON object, got {type(obj).__name__}")
    return rows


def _text(path, row, obj, key, *, allow_empty=False) -> str:
    if key not in obj or obj[key] is None:
        raise DataError(path, row, f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(path, row, f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, row, f"field '{key}' is empty")
    return value


# ----------------------------------------------------------------------------- eval sets
def load_eval_set(source: str | os.PathLike = "builtin", *, require_references: bool = True) -> list[dict]:
    """Load an eval set from a file, a folder, ``"builtin"`` or ``"hub"`` (see module docstring)."""
    if str(source) == "builtin":
        return _parse_eval_rows(BUILTIN_EVAL, _read_eval_rows(BUILTIN_EVAL), require_references=False)
    if str(source) == "hub":
        return load_eval_set_from_hub()
    path = Path(source).expanduser()
    if path.is_dir():
        for candidate in FOLDER_CANDIDATES:
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise DataError(path, None, f"folder holds none of {', '.join(FOLDER_CANDIDATES)}")
    return _parse_eval_rows(path, _read_eval_rows(path), require_references=require_references)


def _read_eval_rows(path: Path) -> list[tuple[int, dict]]:
    """Rows of an eval-set file through the one prompt-set loader (``datasets``, cached); null = absent."""
    from spi.prompt_sets import PromptSetError, read_records

    try:
        rows = read_records(path)
    except PromptSetError as err:
        raise DataError(err.source, err.row, err.message) from None
    return [(row, {k: v for k, v in obj.items() if v is not None}) for row, obj in rows]


def _parse_eval_rows(path, rows, *, require_references: bool) -> list[dict]:
    examples, seen = [], {}
    for position, (row, obj) in enumerate(rows):
        instruction = _text(path, row, obj, "instruction")
        if instruction in seen:
            raise DataError(path, row, f"duplicate instruction (first seen at row {seen[instruction]})")
        seen[instruction] = row
        ref_key = "reference_output" if "reference_output" in obj else "output"
        reference = None
        if require_references or obj.get(ref_key) is not None:
            reference = _text(path, row, obj, ref_key)
        index = obj.get("index", position)
        if not isinstance(index, int):
            raise DataError(path, row, f"field 'index' must be an integer, got {index!r}")
        examples.append({
            "index": index,
            "instruction": instruction,
            "dataset": str(obj.get("dataset") or "unknown"),
            "reference_output": reference,
            "reference_generator": obj.get("reference_generator") or obj.get("generator"),
        })
    if len({e["index"] for e in examples}) != len(examples):
        raise DataError(path, None, "duplicate values in field 'index'")
    if not examples:
        raise DataError(path, None, "no rows")
    return examples


def load_eval_set_from_hub() -> list[dict]:  # pragma: no cover - needs the network
    """The official 805 instructions with gpt4_1106_preview references from the hub (if reachable)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise DataError("hub:tatsu-lab/alpaca_eval", None, "HF_HUB_OFFLINE is set; give a local file instead")
    from huggingface_hub import hf_hub_download

    path = hf_hub_download("tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline.json", repo_type="dataset")
    return load_eval_set(path)


def attach_references(eval_set: list[dict], generate: Callable[[list[str]], list[str]], generator: str) -> list[dict]:
    """Copy of ``eval_set`` whose references are produced by ``generate`` (e.g. the base policy)."""
    outputs = generate([e["instruction"] for e in eval_set])
    if len(outputs) != len(eval_set):
        raise ValueError(f"generator '{generator}' returned {len(outputs)} outputs for {len(eval_set)} instructions")
    return [{**e, "reference_output": o, "reference_generator": generator} for e, o in zip(eval_set, outputs, strict=False)]


def subset(eval_set: list[dict], n: int | None, *, stratify: bool = False, seed: int = 0) -> list[dict]:
    """Deterministic subset: the first ``n`` rows, or ``n`` rows stratified by ``dataset``.

    Stratified: each dataset gets a share proportional to its size (largest remainders), drawn with a
    seeded shuffle; the result keeps the eval set's order. Same inputs, same subset.
    """
    if n is None or n >= len(eval_set):
        return list(eval_set)
    if n <= 0:
        raise ValueError("subset size must be positive")
    if not stratify:
        return list(eval_set[:n])
    groups: dict[str, list[int]] = defaultdict(list)
    for pos, e in enumerate(eval_set):
        groups[e["dataset"]].append(pos)
    quotas = {k: n * len(v) / len(eval_set) for k, v in groups.items()}
    take = {k: math.floor(q) for k, q in quotas.items()}
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - take[k]), k))[: n - sum(take.values())]:
        take[k] += 1
    chosen = []
    for k in sorted(groups):
        positions = list(groups[k])
        random.Random(f"{seed}:{k}").shuffle(positions)
        chosen.extend(positions[: take[k]])
    return [eval_set[p] for p in sorted(chosen)]


# ----------------------------------------------------------------------------- model outputs
def read_model_outputs(path: str | os.PathLike, eval_set: list[dict], *, allow_empty: bool = False) -> dict[int, dict]:
    """Model outputs in AlpacaEval format ({instruction, output, generator, dataset}), keyed by eval index.

    Instructions must belong to ``eval_set`` and appear once; outputs must be non-empty unless
    ``allow_empty``.
    """
    by_instruction = {e["instruction"]: e["index"] for e in eval_set}
    result, seen = {}, {}
    for row, obj in read_rows(path):
        instruction = _text(path, row, obj, "instruction")
        if instruction not in by_instruction:
            raise DataError(path, row, f"unknown instruction (not in the eval set): {instruction[:60]!r}")
        if instruction in seen:
            raise DataError(path, row, f"duplicate instruction (first seen at row {seen[instruction]})")
        seen[instruction] = row
        output = _text(path, row, obj, "output", allow_empty=allow_empty)
        result[by_instruction[instruction]] = {
            "instruction": instruction,
            "output": output,
            "generator": str(obj.get("generator") or Path(path).name.split(".")[0]),
            "dataset": obj.get("dataset"),
        }
    return result


def write_model_outputs(path: str | os.PathLike, eval_set: list[dict], outputs: Iterable[str], generator: str) -> Path:
    """Write outputs as AlpacaEval JSON (a list of {instruction, output, generator, dataset})."""
    rows = [
        {"instruction": e["instruction"], "output": o, "generator": generator, "dataset": e["dataset"]}
        for e, o in zip(eval_set, outputs, strict=True)
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def read_indexed(path: str | os.PathLike, field: str, eval_set: list[dict], *, allow_empty: bool = False,
                 keep: set[int] | None = None) -> dict[int, object]:
    """{index: value} from AlpacaEval-layout ``{index, output}`` / ``{index, preference}`` JSONL(.gz) files.

    ``field == "preference"`` values must be numbers in [1, 2]; ``"output"`` values non-empty strings
    (unless ``allow_empty``). Indices must belong to ``eval_set`` and be unique; with ``keep`` (a subset
    of indices) rows outside it are checked, then dropped.
    """
    known = {e["index"] for e in eval_set}
    result: dict[int, object] = {}
    rows_of: dict[int, int] = {}
    for row, obj in read_rows(path):
        index = obj.get("index")
        if not isinstance(index, int):
            raise DataError(path, row, "missing or non-integer field 'index'")
        if index not in known:
            raise DataError(path, row, f"unknown index {index} (not in the eval set)")
        if index in rows_of:
            raise DataError(path, row, f"duplicate index {index} (first seen at row {rows_of[index]})")
        rows_of[index] = row
        if field == "preference":
            result[index] = check_preference(path, row, obj.get("preference"))
        else:
            result[index] = _text(path, row, obj, field, allow_empty=allow_empty)
    if keep is not None:
        result = {i: v for i, v in result.items() if i in keep}
    return result


def check_preference(path, row, value) -> float:
    """A preference must be a finite number in [1, 2] (1 = reference better, 2 = model better)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(path, row, f"preference must be a number in [1, 2], got {value!r}")
    if not 1.0 <= value <= 2.0:
        raise DataError(path, row, f"preference {value} outside [1, 2]")
    return float(value)


def model_files(folder: str | os.PathLike) -> dict[str, Path]:
    """{model name: file} for the ``<model>.jsonl.gz`` / ``<model>.jsonl`` / ``<model>.json`` files of a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, None, "not a folder")
    found = {}
    for path in sorted(folder.iterdir()):
        for suffix in (".jsonl.gz", ".jsonl", ".json"):
            if path.is_file() and path.name.endswith(suffix):
                found[path.name[: -len(suffix)]] = path
                break
    return found
