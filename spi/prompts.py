"""Prompt formatting, and the training prompts (read through :mod:`spi.prompt_sets`).

``chat_prompt_ids`` is the one place a policy prompt is built; ``value_input_ids`` is the one place a
value model's input is built, used by fitting and by search alike (IRO trained its value on templated
prompts and scored raw ones at decode time; sharing one function rules that out).
"""

from __future__ import annotations


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
    """Prompt texts ``[offset, offset + count)`` of any source :func:`spi.prompt_sets.load_prompt_set` reads:
    'builtin:train', 'generated:train[:SEED]', a JSON/JSONL file of either schema, a hub id, ..."""
    from spi.prompt_sets import load_prompt_set

    prompts = load_prompt_set(source, count=None if count is None else offset + count)
    return prompts.texts[offset:]
