"""Statistics of an answer's text that GPT-4-turbo's preferences follow beyond its length.

A local judge built on these (``local:text-bt``, :mod:`evaluation.trained_judge` with ``text_features``)
ranks unseen models better than one on frozen sentence embeddings: the embeddings' 384 weights learn
which training model wrote an answer, these few weights learn how answers are written (structure,
degenerate repetition, refusals, cut-off endings), which carries over to models never seen.
Every feature is a function of the answer alone, so a judge using them stays antisymmetric.
The share of non-Latin letters was tried and dropped: it changed no held-out figure, and its positive
weight would have favoured an answer in the wrong script.
"""

from __future__ import annotations

import re

import numpy as np

FEATURE_NAMES = (
    "log_list_items",
    "log_headers",
    "log_bold_spans",
    "log_code_blocks",
    "log_lines",
    "repeated_trigrams",
    "repeated_lines",
    "refusal_opening",
    "log_typographic_marks",
    "ends_mid_sentence",
    "log_mean_word_length",
)

_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+", re.M)
_HEADER = re.compile(r"^\s*#+\s", re.M)
_REFUSAL = re.compile(r"\b(?:I'm sorry|I am sorry|As an AI|I cannot|I can't|I apologi[sz]e)")
_TYPOGRAPHIC = set("\u2018\u2019\u201c\u201d\u2013\u2014\u2026")  # curly quotes, dashes, ellipsis
_SENTENCE_END = ".!?)\"'`*:"


def _repeated_fraction(items: list) -> float:
    return 1.0 - len(set(items)) / len(items) if items else 0.0


def text_statistics(answer: str) -> list[float]:
    """The FEATURE_NAMES values of one answer (counts as log1p; fractions in [0, 1])."""
    lines = [line for line in answer.split("\n") if line.strip()]
    words = answer.split()
    trigrams = [tuple(words[k:k + 3]) for k in range(len(words) - 2)]
    stripped = answer.rstrip()
    return [
        float(np.log1p(len(_LIST_ITEM.findall(answer)))),
        float(np.log1p(len(_HEADER.findall(answer)))),
        float(np.log1p(answer.count("**") // 2)),
        float(np.log1p(answer.count("```") // 2)),
        float(np.log1p(len(lines))),
        _repeated_fraction(trigrams),
        _repeated_fraction(lines),
        float(bool(_REFUSAL.search(answer[:300]))),
        float(np.log1p(sum(c in _TYPOGRAPHIC for c in answer))),
        float(not stripped or stripped[-1] not in _SENTENCE_END),
        float(np.log1p(np.mean([len(w) for w in words]))) if words else 0.0,
    ]


def text_statistics_matrix(answers) -> np.ndarray:
    """Rows of :func:`text_statistics`, one per answer; shape (n, len(FEATURE_NAMES))."""
    return np.array([text_statistics(a) for a in answers], dtype=float).reshape(-1, len(FEATURE_NAMES))
