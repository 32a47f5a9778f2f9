"""The one record type every dataset loader produces, and the errors a loader raises."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

BINARY = "binary"
OPEN = "open"
TASKS = (BINARY, OPEN)
YES_NO = ("no", "yes")  # binary head classes, in index order

# Text a tokenizer or a terminal cannot take: control characters other than whitespace, lone surrogates.
UNSAFE_TEXT = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with its `UNSAFE_TEXT` characters escaped (``\\x1b``, ``\\ud800``), safe to print."""
    return UNSAFE_TEXT.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class DataError(ValueError):
    """Bad input: names the file and record at fault (unprintable characters in the message are escaped)."""

    def __init__(self, message: str):
        super().__init__(printable(message))


@dataclass(frozen=True)
class VQARecord:
    """One question about one image.

    `answer` is normalised (see `answers.normalize_answer`); the task follows from it: a yes/no
    answer belongs to the binary head, every other answer to the open-ended head. `answer_type` is
    the dataset's own label (VQA-RAD's CLOSED/OPEN), kept for reporting only. `question_type` is
    what the question asks about (VQA-RAD's PRES, POS, ...; see `question_types`), None where the
    format has none; it trains the experts' type classifier (``model.experts.route=question_type``).
    """

    image: Path
    question: str
    answer: str
    answer_type: str | None
    qid: str
    source: str  # where it came from, for messages: "trainset.json record 17"
    # Soft targets (VQA v2: min(n/3, 1) per distinct answer); None means the single `answer`.
    answer_scores: Mapping[str, float] | None = None
    # All human answers, normalised (VQA v2's 10), for the VQA accuracy metric.
    all_answers: tuple[str, ...] = field(default=())
    question_type: str | None = None

    @property
    def task(self) -> str:
        return BINARY if self.answer in YES_NO else OPEN


@dataclass(frozen=True)
class Rejection:
    """A record a loader skipped under ``skip_invalid``, and why."""

    source: str
    reason: str  # short category used for counting: "missing image", "empty question", ...
    detail: str = ""


@dataclass
class VQASplits:
    """A dataset's splits, plus what was rejected while loading them."""

    name: str
    train: list[VQARecord]
    val: list[VQARecord]
    test: list[VQARecord]
    rejected: list[Rejection] = field(default_factory=list)

    def split(self, name: str) -> list[VQARecord]:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)
