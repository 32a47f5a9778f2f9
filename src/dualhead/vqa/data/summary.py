"""What a loaded dataset holds: counts per split, task and answer type, duplicates, vocabulary
coverage, rejected records and (optionally) undecodable images and questions the text encoder would
truncate. Backs ``dualhead data summary``."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sized
from typing import Any

from .answers import AnswerVocab
from .images import load_rgb
from .records import BINARY, OPEN, DataError, VQARecord, VQASplits

SPLITS = ("train", "val", "test")
MAX_EXAMPLES = 10  # rejected records listed by name (all are counted)


def _row_key(record: VQARecord) -> tuple[str, str, str]:
    return str(record.image), record.question, record.answer


def _split_summary(records: list[VQARecord], train_rows: set[tuple[str, str, str]] | None) -> dict[str, Any]:
    tasks = Counter(record.task for record in records)
    rows = Counter(_row_key(record) for record in records)
    summary = {
        "questions": len(records),
        "images": len({record.image for record in records}),
        "binary": tasks[BINARY],
        "open": tasks[OPEN],
        "answer_types": dict(sorted(Counter(record.answer_type or "-" for record in records).items())),
        # Rows repeating an earlier image + question + answer of the same split.
        "duplicate_rows": sum(count - 1 for count in rows.values()),
    }
    if train_rows is not None:
        summary["rows_in_train"] = sum(count for row, count in rows.items() if row in train_rows)
    return summary


def _check_images(splits: VQASplits) -> dict[str, Any]:
    first_use: dict[str, str] = {}
    for name in SPLITS:
        for record in splits.split(name):
            first_use.setdefault(str(record.image), record.source)
    failed = []
    for path, source in sorted(first_use.items()):
        try:
            load_rgb(path, source)
        except DataError as err:
            failed.append({"path": path, "reason": str(err)})
    return {"checked": len(first_use), "failed": failed}


def _long_questions(splits: VQASplits, tokenize: Callable[[str], Sized], max_length: int) -> dict[str, Any]:
    lengths: dict[str, int] = {}  # question -> token count, each distinct question tokenized once
    counts: dict[str, Any] = {"max_length": max_length}
    for name in SPLITS:
        for record in splits.split(name):
            if record.question not in lengths:
                lengths[record.question] = len(tokenize(record.question))
        counts[name] = sum(lengths[record.question] > max_length for record in splits.split(name))
    counts["longest"] = max(lengths.values(), default=0)
    return counts


def summarize(
    splits: VQASplits,
    vocab: AnswerVocab,
    check_images: bool = False,
    tokenize: Callable[[str], Sized] | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Counts that describe a dataset as loaded; `check_images` decodes every image (slow).

    Given `tokenize` (a question -> its tokens, as the text encoder sees them, special tokens included)
    and `max_length`, it also counts the questions per split longer than `max_length` tokens, which
    the encoder truncates.
    """
    if (tokenize is None) != (max_length is None):
        raise ValueError("summarize needs both tokenize and max_length to count long questions, or neither")
    train_rows = {_row_key(record) for record in splits.train}
    answers_by_pair: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name in SPLITS:
        for record in splits.split(name):
            answers_by_pair[str(record.image), record.question].add(record.answer)
    summary: dict[str, Any] = {
        "dataset": splits.name,
        "splits": {
            name: _split_summary(splits.split(name), None if name == "train" else train_rows)
            for name in SPLITS
        },
        # Image + question pairs given different answers anywhere in the dataset.
        "conflicting_pairs": sum(len(answers) > 1 for answers in answers_by_pair.values()),
        "vocab": {
            "size": len(vocab),
            "val": vocab.coverage(splits.val),
            "test": vocab.coverage(splits.test),
        },
        "rejected": dict(Counter(rejection.reason for rejection in splits.rejected).most_common()),
        "rejected_examples": [
            {"source": r.source, "reason": r.reason, "detail": r.detail}
            for r in splits.rejected[:MAX_EXAMPLES]
        ],
    }
    if tokenize is not None and max_length is not None:
        summary["long_questions"] = _long_questions(splits, tokenize, max_length)
    if check_images:
        summary["image_check"] = _check_images(splits)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """`summarize` output as readable markdown: a table per split, then notes."""
    splits = summary["splits"]
    answer_types = sorted({kind for split in splits.values() for kind in split["answer_types"]})

    def row(label: str, values: list[Any]) -> str:
        return f"| {label} | " + " | ".join(str(value) for value in values) + " |"

    lines = [
        f"## {summary['dataset']}",
        "",
        "| | " + " | ".join(SPLITS) + " |",
        "|---|" + "---:|" * len(SPLITS),
    ]
    for key, label in [
        ("questions", "questions"),
        ("images", "images"),
        ("binary", "binary (yes/no) task"),
        ("open", "open task"),
    ]:
        lines.append(row(label, [splits[name][key] for name in SPLITS]))
    for kind in answer_types:
        lines.append(
            row(f"answer type {kind}", [splits[name]["answer_types"].get(kind, 0) for name in SPLITS])
        )
    lines.append(row("duplicate rows", [splits[name]["duplicate_rows"] for name in SPLITS]))
    lines.append(row("rows also in train", [splits[name].get("rows_in_train", "-") for name in SPLITS]))

    vocab = summary["vocab"]
    outside = ", ".join(
        f"{name} {vocab[name]['out_of_vocab']} of {vocab[name]['open_questions']}" for name in ("val", "test")
    )
    lines += [
        "",
        f"- open-answer vocabulary (from train): {vocab['size']} answers",
        f"- open-task answers outside it: {outside}",
        f"- image + question pairs with conflicting answers: {summary['conflicting_pairs']}",
    ]
    if "long_questions" in summary:
        long = summary["long_questions"]
        per_split = ", ".join(f"{name} {long[name]}" for name in SPLITS)
        lines.append(
            f"- questions over {long['max_length']} tokens (truncated): {per_split} "
            f"(longest: {long['longest']} tokens)"
        )
    rejected = summary["rejected"]
    counts = ", ".join(f"{reason}: {count}" for reason, count in rejected.items()) or "none"
    lines.append(f"- rejected records: {sum(rejected.values())} ({counts})")
    lines += [
        f"  - {r['source']}: {r['reason']} {r['detail']}".rstrip() for r in summary["rejected_examples"]
    ]
    if "image_check" in summary:
        check = summary["image_check"]
        lines.append(f"- images decoded: {check['checked']}, failed: {len(check['failed'])}")
        lines += [f"  - {failure['path']}: {failure['reason']}" for failure in check["failed"]]
    return "\n".join(lines)
