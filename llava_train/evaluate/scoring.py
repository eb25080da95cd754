"""Scoring generated answers against references: pure functions over strings, no model.

Two kinds of question:
- multiple choice: the question lists options (`A. red`, `(B) blue`, one per line) and the
  reference is one of their letters; the prediction is right when the letter it gives (`B`,
  `(B)`, `B. blue`, `The answer is B`, or the option's text alone) is the reference's;
- everything else: exact match after normalisation (lower case, punctuation and the articles
  a/an/the removed, whitespace collapsed), as VQA and SQuAD normalise.

`summarise` adds the accuracy overall, per kind and per value of any field of the records' `meta`.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
# An option line: "A. text", "A) text", "(A) text", "A: text".
_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s*(\S.*?)\s*$", re.MULTILINE)
# A bare letter reference: "B", "(B)", "B.", "B)".
_LETTER_ONLY = re.compile(r"^\s*\(?([A-Z])\)?[.:]?\s*$")
# A prediction that starts with its letter: "B", "B.", "(B) blue", "B: blue" (not "A red circle").
_LEADING_LETTER = re.compile(r"^\W*\(?([A-Z])(?:$|[.):,]|\s*$)")
_STATED_LETTER = re.compile(r"(?i:\b(?:answer|option|choice)\s*(?:is|:)?)\s*\(?([A-Z])\b")


@dataclass(frozen=True)
class Score:
    kind: str  # "choice" or "exact"
    correct: bool
    extracted: str  # what was compared: the chosen letter, or the normalised prediction


def normalise_answer(text: str) -> str:
    words = text.lower().translate(_PUNCTUATION).split()
    return " ".join(word for word in words if word not in ARTICLES)


def options_in(question: str) -> dict[str, str]:
    """The lettered options listed in a question ({"A": "red", ...}); {} when fewer than two."""
    options = {letter: text for letter, text in _OPTION.findall(question)}
    return options if len(options) >= 2 else {}


def choice_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a prediction gives, or None when it names none of `options`."""
    alone = _LETTER_ONLY.match(prediction.upper())  # "b" alone is a letter too
    for found in (alone, _LEADING_LETTER.search(prediction), _STATED_LETTER.search(prediction)):
        if found and found.group(1) in options:
            return found.group(1)
    said = normalise_answer(prediction)
    matches = [letter for letter, text in options.items() if normalise_answer(text) == said]
    return matches[0] if len(matches) == 1 else None


def reference_letter(reference: str, options: dict[str, str]) -> str | None:
    """The reference's letter when it is a bare option letter of this question."""
    found = _LETTER_ONLY.match(reference)
    if found and found.group(1) in options:
        return found.group(1)
    return None


def score(prediction: str, reference: str, question: str = "") -> Score:
    options = options_in(question)
    letter = reference_letter(reference, options) if options else None
    if letter is not None:
        chosen = choice_letter(prediction, options)
        return Score("choice", chosen == letter, chosen or "")
    said = normalise_answer(prediction)
    return Score("exact", said == normalise_answer(reference), said)


def summarise(rows: list[dict], by: list[str] | tuple[str, ...] = ()) -> dict:
    """Accuracy of prediction rows ({"correct", "kind", "meta"}) overall, per kind and per meta field value."""
    summary = {**_accuracy(rows), "kinds": _grouped(rows, lambda row: row["kind"])}
    summary["by"] = {field: _grouped(rows, lambda row, f=field: str(row["meta"][f])) for field in by}
    return summary


def _accuracy(rows: list[dict]) -> dict:
    hits = sum(bool(row["correct"]) for row in rows)
    return {"num": len(rows), "correct": hits, "accuracy": hits / len(rows) if rows else 0.0}


def _grouped(rows: list[dict], key) -> dict[str, dict]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return {name: _accuracy(groups[name]) for name in sorted(groups)}


def format_table(summary: dict) -> str:
    """The summary as an aligned text table: overall, then one block per breakdown."""
    lines = [f"{'':<24} {'accuracy':>9} {'correct':>8} {'num':>6}", _row("all", summary)]
    blocks = [("kind", summary["kinds"])] if len(summary["kinds"]) > 1 else []
    for name, groups in blocks + list(summary["by"].items()):
        lines.append(f"by {name}")
        lines += [_row(f"  {value}", stats) for value, stats in groups.items()]
    return "\n".join(lines)


def _row(label: str, stats: dict) -> str:
    return f"{label:<24} {stats['accuracy']:>9.1%} {stats['correct']:>8} {stats['num']:>6}"
