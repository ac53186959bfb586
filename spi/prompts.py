"""Prompt formatting (prompt sets are read by :mod:`spi.prompt_sets`).

``chat_prompt_ids`` is the one place a policy prompt is built; ``value_input_ids`` is the one place a
value model's input is built, used by fitting and by search alike (IRO trained its value on templated
prompts and scored raw ones at decode time; sharing one function rules that out); ``reencoded_ids`` is
the input of a model with another tokenizer than the policy's, built from the text.
"""

from __future__ import annotations


def chat_prompt_ids(tokenizer, instruction: str, system_message: str | None = None) -> list[int]:
    """Token ids of the chat-templated instruction, ending where the assistant's answer begins;
    ``system_message`` (None: none, '' an empty one) becomes a system turn before it."""
    system = [] if system_message is None else [{"role": "system", "content": system_message}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    preamble = f"{system_message}\n\n" if system_message else ""
    return tokenizer(preamble + instruction + "\n\nAnswer:", add_special_tokens=True)["input_ids"]


def value_input_ids(prompt_ids: list[int], response_ids: list[int]) -> list[int]:
    """The value model reads the policy's templated prompt followed by the response tokens so far."""
    return list(prompt_ids) + list(response_ids)


def reencoded_ids(tokenizer, instruction: str, response_text: str,
                  system_message: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) as a model with another tokenizer than the policy's reads them: the
    instruction in that model's own chat template, the response's text tokenized anew."""
    prompt = chat_prompt_ids(tokenizer, instruction, system_message)
    return prompt, tokenizer(response_text, add_special_tokens=False)["input_ids"]
