"""Training prompts prepared from a preference dataset the way IRO's code prepares them.

IRO samples its rollout prompts from UltraFeedback (``HuggingFaceH4/ultrafeedback_binarized``, split
``train_prefs``): prompts of at most 512 tokens, shuffled with seed 1, and each iteration takes the next
disjoint slice (8192 prompts). :func:`prepare_prompts` writes that list once, as a JSONL file of
``{"instruction": ...}`` records that ``prompts.train`` reads; the recipe's ``prompts.offset`` and
``iterations.prompts_per_iteration`` then cut the slices (``spi.pipeline.train_instructions``).

The source is a hub id (loaded through ``datasets`` when online or from its cache) or a local
``.jsonl``/``.json``/``.parquet`` file with the same column, so a machine without the hub can prepare the
file from a copy. Lengths are counted in the policy's tokenizer on the chat-templated prompt, the
sequence the policy actually reads. Empty prompts and repeats of an earlier prompt are dropped too: a
repeat would put one prompt in two "disjoint" slices.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from spi.prompts import chat_prompt_ids

DEFAULT_SOURCE = "HuggingFaceH4/ultrafeedback_binarized"
DEFAULT_SPLIT = "train_prefs"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class PreparedPrompts:
    path: Path
    read: int  # records in the source
    kept: int
    too_long: int
    empty: int
    repeated: int
    digest: str  # sha256 of the written file, first 16 hex digits


def load_source_column(source: str, split: str, column: str) -> list:
    """The values of ``column`` in a local file or a hub dataset's ``split``; a clear error otherwise."""
    from datasets import load_dataset

    path = Path(source).expanduser()
    try:
        if path.suffix in LOCAL_FORMATS:
            if not path.is_file():
                raise FileNotFoundError(f"{source}: no such file")
            dataset = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            dataset = load_dataset(source.removeprefix("hf:"), split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        hint = " (HF_HUB_OFFLINE=1: give a local .jsonl/.json/.parquet copy)" if offline and not path.suffix else ""
        raise ValueError(f"prompt source '{source}' cannot be read{hint}: {err}") from None
    if column not in dataset.column_names:
        raise ValueError(f"prompt source '{source}' has no column '{column}' (columns: "
                         f"{', '.join(dataset.column_names)})")
    return dataset[column]


def prepare_prompts(source: str, out: str | Path, tokenizer, *, split: str = DEFAULT_SPLIT, column: str = "prompt",
                    max_prompt_tokens: int = 512, seed: int = 1, system_message: str | None = None,
                    progress: bool = True) -> PreparedPrompts:
    """Filter, shuffle (a seeded permutation, as ``datasets.Dataset.shuffle(seed=...)``) and write."""
    from datasets import Dataset

    values = load_source_column(source, split, column)
    kept, seen, too_long, empty, repeated = [], set(), 0, 0, 0
    for value in tqdm(values, desc="prompts", unit="prompt", disable=not progress, leave=False):
        text = value.strip() if isinstance(value, str) else ""
        if not text:
            empty += 1
        elif text in seen:
            repeated += 1
        elif len(chat_prompt_ids(tokenizer, text, system_message)) > max_prompt_tokens:
            too_long += 1
        else:
            kept.append(text)
        seen.add(text)
    shuffled = Dataset.from_dict({"instruction": kept}).shuffle(seed=seed)["instruction"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"instruction": x}, ensure_ascii=False) + "\n" for x in shuffled)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(body, encoding="utf-8")
    partial.replace(out)  # a reader never sees half a file
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]
    return PreparedPrompts(out, len(values), len(kept), too_long, empty, repeated, digest)
