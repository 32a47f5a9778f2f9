"""PathVQA (He et al., 2020): ``qas/{train,val,test}_vqa.pkl`` and ``images/{split}/<img_id>.jpg``.

Each pickle holds a list of dicts with ``img_id``, ``sent`` (the question), ``answer`` or ``label``
(answer -> score; the best-scored answer is taken), ``answer_type`` and ``question_id``. Pickles can
run code when loaded: read only files from a source you trust (this is the published format).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from .loading import FieldNames, RecordBuilder, build_records, expect_list, numbered, require_dir
from .records import DataError, VQARecord, VQASplits

FIELDS = FieldNames(image="img_id", question="sent", qid="question_id")


def _with_answer(raw: Any) -> Any:
    # Records without `answer` carry `label`: the answer is its best-scored key (None when empty).
    if isinstance(raw, dict) and "answer" not in raw and "label" in raw:
        label = raw["label"]
        best = max(label, key=label.get) if isinstance(label, dict) and label else None
        return {**raw, "answer": best}
    return raw


def _read(root: Path, split: str, builder: RecordBuilder) -> list[VQARecord]:
    path = root / "qas" / f"{split}_vqa.pkl"
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with path.open("rb") as file:
            data = pickle.load(file)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as err:
        raise DataError(f"cannot unpickle {path}: {err}") from err
    rows = [
        (location, _with_answer(raw))
        for location, raw in numbered(f"qas/{path.name}", expect_list(data, path))
    ]
    return build_records(rows, builder, root / "images" / split, FIELDS, image_suffix=".jpg")


def load(root: Path, *, skip_invalid: bool = False) -> VQASplits:
    """Load PathVQA from `root` (the folder holding qas/ and images/), with its own val split."""
    root = require_dir(Path(root), "PathVQA folder")
    builder = RecordBuilder(root, skip_invalid)
    train, val, test = (_read(root, split, builder) for split in ("train", "val", "test"))
    return VQASplits("pathvqa", train, val, test, builder.rejected)
