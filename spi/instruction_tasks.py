"""Verifiable instruction-following prompts in IFEval's schema, generated from this project's own pool.

A prompt is a base instruction plus 1-3 verifiable constraints, as a record
``{key, prompt, instruction_id_list, kwargs}`` (IFEval's schema). The constraint sentences are the
constraint kinds' own phrasings: ``build_description(**kwargs)`` of if_verifiable's IFEval instruction
classes, called with arguments drawn here from a seeded ``random.Random`` (the classes would otherwise
draw missing arguments from the global RNG). Kinds that conflict in IFEval's registry are never combined.

The base instructions are every task form x topic of ``data/instruction_pool.json``, written for this
project. The train and held-out pools use disjoint topics, and a test checks that no base instruction
equals or contains an AlpacaEval or IFBench prompt. ``generate`` is deterministic and prefix-stable: the
first n prompts of a call with count N > n are the prompts of the call with count n.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

POOL_FILE = Path(__file__).parent / "data" / "instruction_pool.json"
SPLITS = ("train", "heldout")
RELATIONS = ("less than", "at least")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?", "Thank you for reading.",
               "That is all for now.", "Let me know what you think.", "Have a wonderful day.")

# Kinds whose checkers run offline with the packages installed here (a test runs each one). Left out:
# length_constraints:number_sentences and change_case:capital_word_frequency (NLTK's punkt data, which
# nltk would download), language:response_language (depends on langdetect's random draw).
DEFAULT_KINDS = (
    "punctuation:no_comma", "change_case:english_lowercase", "change_case:english_capital",
    "startend:end_checker", "startend:quotation", "keywords:existence", "keywords:frequency",
    "keywords:forbidden_words", "keywords:letter_frequency", "detectable_format:number_bullet_lists",
    "detectable_format:json_format", "detectable_format:title", "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections", "detectable_format:constrained_response",
    "length_constraints:number_words", "length_constraints:number_paragraphs",
    "length_constraints:nth_paragraph_first_word", "detectable_content:postscript",
    "detectable_content:number_placeholders", "combination:repeat_prompt", "combination:two_responses",
)
# Kinds a response settles in its first tokens (a comma or a capital already written, the opening quote,
# a forbidden word): where a value read at chunk boundaries can prune early.
EARLY_KINDS = (
    "punctuation:no_comma", "change_case:english_lowercase", "change_case:english_capital",
    "keywords:forbidden_words", "startend:quotation", "detectable_format:title", "combination:repeat_prompt",
)


# ----------------------------------------------------------------------------- base instructions
@cache
def _pool() -> dict:
    return json.loads(POOL_FILE.read_text(encoding="utf-8"))


def base_instructions(split: str) -> list[tuple[str, str]]:
    """(base instruction, topic) pairs of a split: every task form x every topic of that split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = _pool()
    return [(form.format(topic=topic), topic) for topic in pool["topics"][split] for form in pool["forms"]]


# ----------------------------------------------------------------------------- constraint arguments
def _words(rng: random.Random, k: int) -> list[str]:
    from if_verifiable.ifeval.instructions_util import WORD_LIST

    return rng.sample(WORD_LIST, k)


def _forbidden(rng: random.Random, base: str, topic: str) -> dict:
    """Two forbidden words; half the time one of them comes from the topic, so the constraint bites."""
    words = _words(rng, 2)
    topic_words = [w for w in topic.replace("-", " ").split() if len(w) >= 4 and w.isalpha()]
    if topic_words and rng.random() < 0.5:
        words[0] = rng.choice(topic_words).lower()
    return {"forbidden_words": sorted(set(words))}


def _paragraph_first_word(rng: random.Random, base: str, topic: str) -> dict:
    num = rng.randint(2, 5)
    return {"num_paragraphs": num, "nth_paragraph": rng.randint(1, num), "first_word": _words(rng, 1)[0]}


ARGS: dict[str, Callable[[random.Random, str, str], dict]] = {
    "keywords:existence": lambda rng, base, topic: {"keywords": sorted(_words(rng, 2))},
    "keywords:frequency": lambda rng, base, topic: {
        "keyword": _words(rng, 1)[0], "frequency": rng.randint(1, 3), "relation": rng.choice(RELATIONS)},
    "keywords:forbidden_words": _forbidden,
    "keywords:letter_frequency": lambda rng, base, topic: {
        "letter": rng.choice(string.ascii_lowercase), "let_frequency": rng.randint(1, 10),
        "let_relation": rng.choice(RELATIONS)},
    "length_constraints:number_words": lambda rng, base, topic: {
        "num_words": rng.randrange(50, 301, 10), "relation": rng.choice(RELATIONS)},
    "length_constraints:number_sentences": lambda rng, base, topic: {
        "num_sentences": rng.randint(1, 10), "relation": rng.choice(RELATIONS)},
    "length_constraints:number_paragraphs": lambda rng, base, topic: {"num_paragraphs": rng.randint(2, 5)},
    "length_constraints:nth_paragraph_first_word": _paragraph_first_word,
    "detectable_format:number_bullet_lists": lambda rng, base, topic: {"num_bullets": rng.randint(1, 5)},
    "detectable_format:number_highlighted_sections": lambda rng, base, topic: {"num_highlights": rng.randint(1, 4)},
    "detectable_format:multiple_sections": lambda rng, base, topic: {
        "section_spliter": rng.choice(("Section", "SECTION")), "num_sections": rng.randint(2, 5)},
    "detectable_content:postscript": lambda rng, base, topic: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
    "detectable_content:number_placeholders": lambda rng, base, topic: {"num_placeholders": rng.randint(1, 4)},
    "startend:end_checker": lambda rng, base, topic: {"end_phrase": rng.choice(END_PHRASES)},
    "change_case:capital_word_frequency": lambda rng, base, topic: {
        "capital_frequency": rng.randint(1, 20), "capital_relation": rng.choice(RELATIONS)},
}
NO_ARGS = ("punctuation:no_comma", "change_case:english_lowercase", "change_case:english_capital",
           "startend:quotation", "detectable_format:json_format", "detectable_format:title",
           "detectable_format:constrained_response", "combination:two_responses")
REPEAT = "combination:repeat_prompt"  # its argument is the request itself, filled in when the prompt is built
SUPPORTED_KINDS = tuple(sorted({*ARGS, *NO_ARGS, REPEAT}))


@cache
def _conflicts() -> dict[str, frozenset[str]]:
    """IFEval's conflict map made symmetric (on a copy: conflict_make mutates its argument)."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, conflict_make

    symmetric = conflict_make({kind: set(others) for kind, others in INSTRUCTION_CONFLICTS.items()})
    return {kind: frozenset(others) for kind, others in symmetric.items()}


def conflicting(kinds: Iterable[str]) -> bool:
    """True when two of ``kinds`` conflict (or one repeats) according to IFEval's registry."""
    kinds = list(kinds)
    table = _conflicts()
    return any(b in table.get(a, ()) for i, a in enumerate(kinds) for b in kinds[i + 1:])


def check_kinds(kinds: Iterable[str] | None) -> tuple[str, ...]:
    """The kinds to draw from (sorted, deduplicated); an unsupported kind raises naming it."""
    chosen = tuple(sorted(set(DEFAULT_KINDS if kinds is None else kinds)))
    unknown = [k for k in chosen if k not in SUPPORTED_KINDS]
    if unknown:
        raise ValueError(f"unsupported constraint kind(s) {unknown}; supported: {', '.join(SUPPORTED_KINDS)}")
    if not chosen:
        raise ValueError("kinds is empty: give at least one constraint kind")
    return chosen


# ----------------------------------------------------------------------------- prompts
def _describe(kind: str, kwargs: dict) -> tuple[str, dict]:
    """The kind's own phrasing for ``kwargs`` and the arguments as the checker records them."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    instruction = INSTRUCTION_DICT[kind](kind)
    text = instruction.build_description(**kwargs)
    return text, dict(instruction.get_instruction_args() or {})


def _draw_kinds(rng: random.Random, kinds: tuple[str, ...], n: int) -> list[str]:
    """Up to ``n`` mutually compatible kinds, in a seeded random order."""
    candidates = list(kinds)
    rng.shuffle(candidates)
    chosen: list[str] = []
    for kind in candidates:
        if len(chosen) == n:
            break
        if not conflicting([*chosen, kind]):
            chosen.append(kind)
    return chosen


def make_prompt(rng: random.Random, base: str, topic: str, kinds: list[str]) -> tuple[str, list[dict]]:
    """Prompt text and kwargs list for a base instruction and its constraint kinds (in that order)."""
    sentences, kwargs_list, repeat_at = [], [], None
    for position, kind in enumerate(kinds):
        if kind == REPEAT:
            repeat_at = position
            sentences.append(None)
            kwargs_list.append(None)
            continue
        text, recorded = _describe(kind, ARGS[kind](rng, base, topic) if kind in ARGS else {})
        sentences.append(text)
        kwargs_list.append(recorded)
    request = " ".join([base, *(s for s in sentences if s is not None)])
    if repeat_at is None:
        return request, kwargs_list
    # IFEval's repeat_prompt: the request to repeat is everything but the repeat sentence itself.
    text, recorded = _describe(REPEAT, {"prompt_to_repeat": request})
    kwargs_list[repeat_at] = recorded
    return f"{request} {text}", kwargs_list


def generate(split: str, count: int, seed: int = 0, kinds: Iterable[str] | None = None,
             max_constraints: int = 3, min_constraints: int = 1) -> list[dict]:
    """``count`` distinct prompts of ``split`` ("train" or "heldout") in IFEval's schema.

    Deterministic in (split, seed, kinds, min/max_constraints) and prefix-stable in ``count``; the base
    instructions are visited in a seeded order and revisited (with other constraints) past the pool size.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 1 <= min_constraints <= max_constraints:
        raise ValueError(f"need 1 <= min_constraints <= max_constraints, got {min_constraints}, {max_constraints}")
    kinds = check_kinds(kinds)
    pool = base_instructions(split)
    rng = random.Random(f"spi-instruction-tasks/{split}/{seed}")
    order: list[int] = []
    records, seen = [], set()
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 20 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct prompts from kinds {list(kinds)}; "
                             f"got {len(records)}: allow more kinds or more constraints")
        if not order:
            order = list(range(len(pool)))
            rng.shuffle(order)
        base, topic = pool[order.pop()]
        chosen = _draw_kinds(rng, kinds, rng.randint(min_constraints, max_constraints))
        if len(chosen) < min_constraints:
            continue
        prompt, kwargs_list = make_prompt(rng, base, topic, chosen)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"key": f"{split}-{seed}-{len(records)}", "prompt": prompt,
                        "instruction_id_list": chosen, "kwargs": kwargs_list, "base_instruction": base})
    return records
