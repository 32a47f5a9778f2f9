"""Your own data: ``train.jsonl`` (or ``train.csv`` with a header), optional ``val`` and ``test``.

Each record has ``image`` (a path relative to the folder), ``question``, ``answer`` and optionally
``answer_type``, ``question_type`` (what the question asks about; upper-cased, the first of a
comma-separated list; blank means none) and ``qid``. Without a val file, validation is carved from
train by image; without a test file, the test split is empty.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from .loading import FORMATS, FieldNames, RecordBuilder, build_records, carve_val_by_image, require_dir
from .records import DataError, VQARecord, VQASplits

FIELDS = FieldNames(image="image", question_type="question_type")
SUFFIXES = (".jsonl", ".csv")
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]")  # what undecodable bytes become under "surrogateescape"


def _find(root: Path, split: str) -> Path | None:
    found = [root / f"{split}{suffix}" for suffix in SUFFIXES if (root / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(f"both {found[0].name} and {found[1].name} in {root}: keep one of them")
    return found[0] if found else None


def _jsonl_rows(path: Path, builder: RecordBuilder) -> list[tuple[str, Any]]:
    rows = []
    with path.open("rb") as file:
        for number, data in enumerate(file, start=1):
            location = f"{path.name} line {number}"
            try:
                line = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                builder.reject(location, "invalid utf-8", f"byte {err.start}: {err.reason}")
                continue
            if not line.strip():
                continue
            try:
                rows.append((location, json.loads(line)))
            except json.JSONDecodeError as err:
                builder.reject(location, "malformed json", f"column {err.colno}: {err.msg}")
            except (ValueError, RecursionError) as err:  # integers over Python's digit limit, deep nesting
                builder.reject(location, "malformed json", str(err))
    return rows


def _csv_rows(path: Path, builder: RecordBuilder) -> list[tuple[str, Any]]:
    # Bytes that are not UTF-8 decode to lone surrogates (U+DC80-U+DCFF), found below row by row.
    reader = csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig", "surrogateescape"), newline=""))
    try:
        header = next(reader, [])
    except csv.Error as err:
        raise DataError(f"{path}: unreadable header: {err}") from err
    if any(_NOT_UTF8.search(name) for name in header):
        raise DataError(f"{path}: the header is not UTF-8 text")
    missing = [name for name in (FIELDS.image, FIELDS.question, FIELDS.answer) if name not in header]
    if missing:
        raise DataError(f"{path}: the header has no column {', '.join(missing)} (found {header})")
    rows = []
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:  # a field over csv.field_size_limit()
            builder.reject(f"{path.name} line {reader.line_num}", "malformed csv", str(err))
            continue
        if not values:  # a blank line
            continue
        location = f"{path.name} line {reader.line_num}"
        # A short row lacks its last fields; a long row's extra values have no name and are dropped.
        fields = dict(zip(header, values, strict=False))
        bad = next((f"column {name!r}" for name, value in fields.items() if _NOT_UTF8.search(value)), None)
        if bad is not None:
            builder.reject(location, "invalid utf-8", f"{bad} has bytes that are not UTF-8")
            continue
        rows.append((location, fields))


def _read(root: Path, path: Path, builder: RecordBuilder) -> list[VQARecord]:
    rows = _jsonl_rows(path, builder) if path.suffix == ".jsonl" else _csv_rows(path, builder)
    return build_records(rows, builder, root, FIELDS)


@FORMATS.register("jsonl")
def load(
    root: Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_invalid: bool = False,
    allow_outside_root: bool = False,
) -> VQASplits:
    """Load a folder of ``train``/``val``/``test`` JSONL or CSV files (train required); image paths
    must stay inside the folder unless `allow_outside_root`."""
    root = require_dir(Path(root), "dataset folder")
    train_path = _find(root, "train")
    if train_path is None:
        raise DataError(f"no train.jsonl or train.csv in {root}")
    builder = RecordBuilder(root, skip_invalid, allow_outside_root=allow_outside_root)
    train = _read(root, train_path, builder)
    val_path, test_path = _find(root, "val"), _find(root, "test")
    if val_path is None:
        train, val = carve_val_by_image(train, val_fraction, seed)
    else:
        val = _read(root, val_path, builder)
    test = _read(root, test_path, builder) if test_path is not None else []
    return VQASplits("jsonl", train, val, test, builder.rejected)
