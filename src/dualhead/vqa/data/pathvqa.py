"""PathVQA (He et al., 2020): ``qas/{train,val,test}_vqa.pkl`` and ``images/{split}/<img_id>.jpg``.

Each pickle holds a list of dicts with ``img_id``, ``sent`` (the question), ``answer`` or ``label``
(answer -> score; the best-scored answer is taken), ``answer_type`` and ``question_id``. A pickle can
run code when loaded, so these are read by `SafeUnpickler`, which builds plain values only.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from .loading import FORMATS, FieldNames, RecordBuilder, build_records, expect_list, numbered, require_dir
from .records import DataError, VQARecord, VQASplits

FIELDS = FieldNames(image="img_id", question="sent", qid="question_id")


class SafeUnpickler(pickle._Unpickler):
    """Refuses every global (class, function), so only values pickle builds itself load: list, dict,
    tuple, set, str, bytes, int, float, bool, None (sets need protocol 4+, Python 3.8's default).

    Memory stays in proportion to the data: this is the pure-Python unpickler, whose memo is a dict
    (the C one sizes its memo from indices in the data), reading from bytes in memory, and without
    BYTEARRAY8, which allocates the length it states before reading anything."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only plain values are read")

    def _refuse_bytearray8(self) -> None:
        raise pickle.UnpicklingError("refused BYTEARRAY8: only plain values are read")

    dispatch = {**pickle._Unpickler.dispatch, pickle.BYTEARRAY8[0]: _refuse_bytearray8}


def _with_answer(raw: Any) -> Any:
    # Records without `answer` carry `label`: the answer is its best-scored key (None when empty).
    if isinstance(raw, dict) and "answer" not in raw and "label" in raw:
        label = raw["label"]
        if not isinstance(label, dict) or not label:
            answer = None
        elif all(isinstance(score, (int, float)) and not isinstance(score, bool) for score in label.values()):
            answer = max(label, key=label.get)
        else:
            answer = label  # scores that are not numbers: the builder rejects it as an invalid answer
        return {**raw, "answer": answer}
    return raw


def _read(root: Path, split: str, builder: RecordBuilder) -> list[VQARecord]:
    path = root / "qas" / f"{split}_vqa.pkl"
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        data = SafeUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # builds no objects of its own: any failure is the bytes' fault
        raise DataError(f"cannot unpickle {path}: {type(err).__name__}: {err}") from err
    rows = [
        (location, _with_answer(raw))
        for location, raw in numbered(f"qas/{path.name}", expect_list(data, path))
    ]
    return build_records(rows, builder, root / "images" / split, FIELDS, image_suffix=".jpg")


@FORMATS.register("pathvqa")
def load(root: Path, *, skip_invalid: bool = False, allow_outside_root: bool = False) -> VQASplits:
    """Load PathVQA from `root` (the folder holding qas/ and images/), with its own val split."""
    root = require_dir(Path(root), "PathVQA folder")
    builder = RecordBuilder(root, skip_invalid, allow_outside_root=allow_outside_root)
    train, val, test = (_read(root, split, builder) for split in ("train", "val", "test"))
    return VQASplits("pathvqa", train, val, test, builder.rejected)
