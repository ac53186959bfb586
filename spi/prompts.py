"""Prompt formatting and the built-in training prompts.

``chat_prompt_ids`` is the one place a policy prompt is built; ``value_input_ids`` is the one place a
value model's input is built, used by fitting and by search alike (IRO trained its value on templated
prompts and scored raw ones at decode time; sharing one function rules that out).
"""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN_TRAIN = Path(__file__).parent / "data" / "train_prompts.jsonl"


def chat_prompt_ids(tokenizer, instruction: str) -> list[int]:
    """Token ids of the chat-templated instruction, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(instruction + "\n\nAnswer:", add_special_tokens=True)["input_ids"]


def value_input_ids(prompt_ids: list[int], response_ids: list[int]) -> list[int]:
    """The value model reads the policy's templated prompt followed by the response tokens so far."""
    return list(prompt_ids) + list(response_ids)


def load_instructions(source: str, offset: int = 0, count: int | None = None) -> list[str]:
    """Instructions from 'builtin:train' or a JSON/JSONL file whose records have an 'instruction'."""
    path = BUILTIN_TRAIN if source == "builtin:train" else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        records = json.loads(text)
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    instructions = []
    for row, record in enumerate(records, 1):
        value = record.get("instruction") if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}: record {row} has no non-empty 'instruction' field")
        instructions.append(value)
    end = None if count is None else offset + count
    selected = instructions[offset:end]
    if count is not None and len(selected) < count:
        raise ValueError(
            f"{path} has {len(instructions)} instructions; offset {offset} + count {count} needs more"
        )
    return selected
