"""What every dataset loader shares: reading files, validating records, carving validation splits."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualhead.core.registry import Registry

from .answers import normalize_answer
from .question_types import normalize_question_type
from .records import UNSAFE_TEXT, DataError, Rejection, VQARecord, printable

#: Dataset format name -> ``load(root, **options) -> VQASplits``; each format module registers its own.
FORMATS: Registry[Callable[..., Any]] = Registry("data format")


def require_dir(path: Path, what: str) -> Path:
    """`path` if it is a directory, else a DataError saying what was expected there."""
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")
    return path


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing file, bytes that are not UTF-8 or malformed JSON are a DataError
    naming the file and, where the parser gives one, the line and column."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path} is not UTF-8 text: {err.reason} at line {line} (byte {err.start})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"malformed JSON in {path} at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    except (ValueError, RecursionError) as err:  # integers over Python's digit limit, deep nesting
        raise DataError(f"cannot parse JSON in {path}: {err}") from err


def expect_list(data: Any, path: Path, key: str | None = None) -> list:
    """The list of records in a parsed file (optionally under `key`), else a DataError."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path}: expected a JSON object with a {key!r} list")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, found {type(data).__name__}")
    return data


def answer_type(value: Any) -> str | None:
    """A dataset's own answer type, stripped ("CLOSED " -> "CLOSED"); None when absent or blank."""
    if value is None:
        return None
    return str(value).strip() or None


class RecordBuilder:
    """Turns raw fields into validated `VQARecord`s.

    A bad record raises a DataError naming `where` (the dataset folder) and its source, or, with
    `skip_invalid`, is recorded in `rejected` and skipped. Image files are checked for existence
    only (once per image, whose records then share one Path); decoding happens at batch time. An
    image path that resolves outside `where` (``..``, an absolute path, a symlink) is a bad record
    unless `allow_outside_root`.
    """

    def __init__(self, where: Path, skip_invalid: bool = False, *, allow_outside_root: bool = False):
        self.where = where
        self.skip_invalid = skip_invalid
        self.allow_outside_root = allow_outside_root
        self.rejected: list[Rejection] = []
        self._root = where.resolve()
        # (folder, file name) -> (the path when usable, else None; rejection reason; detail).
        self._images: dict[tuple[str, str], tuple[Path | None, str, str]] = {}

    def reject(self, source: str, reason: str, detail: str = "") -> None:
        """Record a bad record, or raise when invalid records are not to be skipped."""
        if not self.skip_invalid:
            raise DataError(
                f"{reason} in {source} (dataset at {self.where})"
                + (f": {detail}" if detail else "")
                + "; fix the record or load with skip_invalid=True (data.skip_invalid=true)"
            )
        self.rejected.append(Rejection(printable(source), reason, printable(detail)))

    def fields(self, raw: Any, names: Sequence[str], source: str) -> list[Any] | None:
        """The values of the named fields of a raw record, or None when it was rejected."""
        if not isinstance(raw, Mapping):
            self.reject(source, "malformed record", f"expected an object, found {type(raw).__name__}")
            return None
        missing = [name for name in names if name not in raw]
        if missing:
            self.reject(source, "missing field", f"no {', '.join(repr(name) for name in missing)}")
            return None
        return [raw[name] for name in names]

    def image_path(self, folder: Path, name: Any, source: str, suffix: str = "") -> Path | None:
        """`folder / (name + suffix)` if that is an existing file inside the dataset folder, else None
        (rejected). `name` is a file name or an integer id (easy-VQA's images are ``<id>.png``)."""
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)
        if not isinstance(name, str) or not name.strip():
            self.reject(source, "missing image", f"image {name!r} is not a file name")
            return None
        key = (str(folder), name.strip() + suffix)
        if key not in self._images:
            self._images[key] = self._locate(folder / key[1])
        path, reason, detail = self._images[key]
        if path is None:
            self.reject(source, reason, detail)
        return path

    def _locate(self, path: Path) -> tuple[Path | None, str, str]:
        try:
            resolved = path.resolve()
            if not self.allow_outside_root and not resolved.is_relative_to(self._root):
                outside = f"image {path} resolves to {resolved}, outside the dataset folder {self._root}"
                return None, "image outside dataset", f"{outside} (allow it with allow_outside_root=True)"
            if path.is_file():
                return path, "", ""
        except (OSError, ValueError) as err:  # a name too long, a NUL byte
            return None, "missing image", f"image path {path} is not usable: {err}"
        return None, "missing image", f"image file {path} does not exist"

    def record(
        self,
        *,
        image: Path | None,
        question: Any,
        answer: Any,
        source: str,
        qid: Any,
        answer_type: str | None = None,
        answer_scores: Mapping[str, float] | None = None,
        all_answers: tuple[str, ...] = (),
        question_type: str | None = None,
    ) -> VQARecord | None:
        """A validated record, or None when it was rejected (`image` None: already rejected)."""
        if image is None:
            return None
        if not isinstance(question, str):
            self.reject(source, "invalid question", f"question is {type(question).__name__}, not text")
            return None
        if not question.strip():
            self.reject(source, "empty question")
            return None
        if answer is None or isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            self.reject(source, "empty answer" if answer is None else "invalid answer", f"answer {answer!r}")
            return None
        answers = (answer, *all_answers)
        for what, text in [("question", question), *(("answer", a) for a in answers if isinstance(a, str))]:
            unsafe = UNSAFE_TEXT.search(text)
            if unsafe is not None:
                code = f"U+{ord(unsafe.group()):04X}"
                detail = f"{what} {text!r:.80} has {code}, a control character or lone surrogate"
                self.reject(source, "invalid text", detail)
                return None
        normalized = normalize_answer(answer)
        if not normalized:
            self.reject(source, "empty answer", f"answer {answer!r} is empty after normalisation")
            return None
        return VQARecord(
            image=image,
            question=question.strip(),
            answer=normalized,
            answer_type=answer_type,
            qid=str(qid),
            source=source,
            answer_scores=answer_scores,
            all_answers=all_answers,
            question_type=question_type,
        )


def carve_val_by_image(
    records: list[VQARecord], fraction: float, seed: int
) -> tuple[list[VQARecord], list[VQARecord]]:
    """Split records into (train, val) by image: `fraction` of the distinct images, drawn with `seed`,
    go to val with all their questions. Record order is kept within each part."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    images = sorted({str(record.image) for record in records})
    count = round(fraction * len(images))
    if fraction > 0 and count == 0 and len(images) > 1:
        count = 1
    val_images = set(random.Random(seed).sample(images, count))
    train = [record for record in records if str(record.image) not in val_images]
    val = [record for record in records if str(record.image) in val_images]
    return train, val


def carve_val_by_question(
    records: list[VQARecord], fraction: float, seed: int
) -> tuple[list[VQARecord], list[VQARecord]]:
    """Split records into (train, val) by question: `fraction` of the records, drawn with `seed`, go to
    val. For datasets whose official test split is by question (VQA-RAD), so val resembles test."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    chosen = set(random.Random(seed).sample(range(len(records)), round(fraction * len(records))))
    train = [record for i, record in enumerate(records) if i not in chosen]
    val = [record for i, record in enumerate(records) if i in chosen]
    return train, val


@dataclass(frozen=True)
class FieldNames:
    """Where a format keeps each value in a record object (None: the format has no such field)."""

    image: str
    question: str = "question"
    answer: str = "answer"
    answer_type: str | None = "answer_type"
    qid: str | None = "qid"
    question_type: str | None = None  # optional in every record (see `question_types`)


def build_records(
    rows: Iterable[tuple[str, Any]],
    builder: RecordBuilder,
    image_dir: Path,
    names: FieldNames,
    *,
    image_suffix: str = "",
    also_required: Sequence[str] = (),
    keep: Callable[[Mapping[str, Any]], bool] | None = None,
    question_type_aliases: Mapping[str, str] | None = None,
) -> list[VQARecord]:
    """Records from raw objects, each given with its location ("trainset.json record 17").

    The source of each record is its location plus its qid where it has one (the location stands
    in for a missing qid). `also_required` names fields that must be present though they are not
    stored; `keep` filters well-formed objects before validation (SLAKE's language);
    `question_type_aliases` maps a format's misspelt types to the right ones.
    """
    required = [names.image, names.question, names.answer, *also_required]
    records = []
    for location, raw in rows:
        qid = raw.get(names.qid) if names.qid is not None and isinstance(raw, Mapping) else None
        source = location if qid is None else f"{location} (qid {qid})"
        values = builder.fields(raw, required, source)
        if values is None or (keep is not None and not keep(raw)):
            continue
        image, question, answer = values[:3]
        try:
            question_type = (
                normalize_question_type(raw.get(names.question_type), question_type_aliases)
                if names.question_type is not None else None
            )
        except ValueError as err:
            builder.reject(source, "invalid question type", str(err))
            continue
        record = builder.record(
            image=builder.image_path(image_dir, image, source, image_suffix),
            question=question,
            answer=answer,
            answer_type=answer_type(raw.get(names.answer_type)) if names.answer_type is not None else None,
            qid=location if qid is None else qid,
            source=source,
            question_type=question_type,
        )
        if record is not None:
            records.append(record)
    return records


def numbered(name: str, records: list) -> list[tuple[str, Any]]:
    """(location, record) pairs for the records of the file called `name`: "trainset.json record 17"."""
    return [(f"{name} record {index}", raw) for index, raw in enumerate(records)]


def json_rows(path: Path, name: str | None = None) -> list[tuple[str, Any]]:
    """The numbered records of a JSON file holding a list; `name` (default: the file name) labels them."""
    return numbered(name or path.name, expect_list(read_json(path), path))
