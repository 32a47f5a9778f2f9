"""Your own data: ``train.jsonl`` (or ``train.csv`` with a header), optional ``val`` and ``test``.

Each record has ``image`` (a path relative to the folder), ``question``, ``answer`` and optionally
``answer_type`` and ``qid``. Without a val file, validation is carved from train by image; without a
test file, the test split is empty.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .loading import FieldNames, RecordBuilder, build_records, carve_val_by_image, require_dir
from .records import DataError, VQARecord, VQASplits

FIELDS = FieldNames(image="image")
SUFFIXES = (".jsonl", ".csv")


def _find(root: Path, split: str) -> Path | None:
    found = [root / f"{split}{suffix}" for suffix in SUFFIXES if (root / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(f"both {found[0].name} and {found[1].name} in {root}: keep one of them")
    return found[0] if found else None


def _jsonl_rows(path: Path, builder: RecordBuilder) -> list[tuple[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            location = f"{path.name} line {number}"
            try:
                rows.append((location, json.loads(line)))
            except json.JSONDecodeError as err:
                builder.reject(location, "malformed json", f"column {err.colno}: {err.msg}")
    return rows


def _csv_rows(path: Path) -> list[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        missing = [
            name
            for name in (FIELDS.image, FIELDS.question, FIELDS.answer)
            if name not in (reader.fieldnames or ())
        ]
        if missing:
            raise DataError(
                f"{path}: the header has no column {', '.join(missing)} (found {reader.fieldnames})"
            )
        # Short rows leave None in their missing columns: treat those fields as absent.
        return [
            (
                f"{path.name} line {reader.line_num}",
                {k: v for k, v in row.items() if k is not None and v is not None},
            )
            for row in reader
        ]


def _read(root: Path, path: Path, builder: RecordBuilder) -> list[VQARecord]:
    rows = _jsonl_rows(path, builder) if path.suffix == ".jsonl" else _csv_rows(path)
    return build_records(rows, builder, root, FIELDS)


def load(root: Path, *, val_fraction: float = 0.1, seed: int = 0, skip_invalid: bool = False) -> VQASplits:
    """Load a folder of ``train``/``val``/``test`` JSONL or CSV files (train required)."""
    root = require_dir(Path(root), "dataset folder")
    train_path = _find(root, "train")
    if train_path is None:
        raise DataError(f"no train.jsonl or train.csv in {root}")
    builder = RecordBuilder(root, skip_invalid)
    train = _read(root, train_path, builder)
    val_path, test_path = _find(root, "val"), _find(root, "test")
    if val_path is None:
        train, val = carve_val_by_image(train, val_fraction, seed)
    else:
        val = _read(root, val_path, builder)
    test = _read(root, test_path, builder) if test_path is not None else []
    return VQASplits("jsonl", train, val, test, builder.rejected)
