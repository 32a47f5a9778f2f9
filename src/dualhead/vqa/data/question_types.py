"""Question types: a dataset's label of what a question asks about (VQA-RAD's ``question_type``,
SLAKE's ``content_type``, an optional ``question_type`` field in JSONL/CSV).

Types are normalised to upper case ("Other" and "OTHER" are one type). A combined type ("PRES, POS",
VQA-RAD) is reduced to its first listed type, so every question has at most one type and one
expert-routing target. Formats without types leave them None.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .records import UNSAFE_TEXT, VQARecord


def normalize_question_type(value: Any, aliases: Mapping[str, str] | None = None) -> str | None:
    """The first listed type of `value`, stripped and upper-cased, then mapped through `aliases`
    (a format's known typos); None when absent or blank. Anything but text is a ValueError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"question type {value!r} is {type(value).__name__}, not text")
    if UNSAFE_TEXT.search(value):
        raise ValueError(f"question type {value!r:.80} has a control character or lone surrogate")
    first = value.split(",")[0].strip().upper()
    if not first:
        return None
    return (aliases or {}).get(first, first)


def question_type_vocabulary(records: Iterable[VQARecord]) -> list[str]:
    """The distinct question types of `records` (a training split), sorted: the type classifier's classes."""
    return sorted({record.question_type for record in records if record.question_type is not None})
