"""VQA-RAD (Lau et al., 2018): ``trainset.json`` / ``testset.json`` beside ``images/``.

Copes with the published quirks: numbers as answers, stray spaces, ``"CLOSED "``, mixed case.
Duplicate rows are real published rows and are kept. `question_type` is kept per record: upper-cased
("Other" is "OTHER"), a combination ("PRES, POS") reduced to its first listed type, and the two
published typos (``ATRIB``, ``PRSE``) read as ATTRIB and PRES. Validation is carved from train by
question, as the published test split is (all test images also appear in train): a validation split by image
would judge a different task from the test and pick checkpoints badly.
"""

from __future__ import annotations

from pathlib import Path

from .loading import (
    FORMATS,
    FieldNames,
    RecordBuilder,
    build_records,
    carve_val_by_question,
    json_rows,
    require_dir,
)
from .records import VQARecord, VQASplits

FIELDS = FieldNames(image="image_name", question_type="question_type")
QUESTION_TYPE_TYPOS = {"ATRIB": "ATTRIB", "PRSE": "PRES"}


def _read(root: Path, filename: str, builder: RecordBuilder) -> list[VQARecord]:
    return build_records(
        json_rows(root / filename), builder, root / "images", FIELDS, question_type_aliases=QUESTION_TYPE_TYPOS
    )


@FORMATS.register("vqa_rad")
def load(
    root: Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_invalid: bool = False,
    allow_outside_root: bool = False,
) -> VQASplits:
    """Load VQA-RAD from `root` (the folder holding trainset.json, testset.json and images/)."""
    root = require_dir(Path(root), "VQA-RAD folder")
    builder = RecordBuilder(root, skip_invalid, allow_outside_root=allow_outside_root)
    train, val = carve_val_by_question(_read(root, "trainset.json", builder), val_fraction, seed)
    test = _read(root, "testset.json", builder)
    return VQASplits("vqa_rad", train, val, test, builder.rejected)
