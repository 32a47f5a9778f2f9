"""easy-VQA (the ``easy-vqa`` PyPI package): simple shapes and colours, 64x64 images.

Layout (the package's own, under its ``data/`` folder): ``{train,test}/questions.json``, a list of
``[question, answer, image_id]``, and images ``{train,test}/images/<image_id>.png``. Validation is
carved from train by image.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from .loading import (
    FORMATS,
    FieldNames,
    RecordBuilder,
    build_records,
    carve_val_by_image,
    json_rows,
    require_dir,
)
from .records import VQARecord, VQASplits

FIELDS = FieldNames(image="image_id", answer_type=None, qid=None)
_TRIPLE = ("question", "answer", "image_id")


def package_root() -> Path:
    """The data folder of the installed ``easy-vqa`` package."""
    return Path(str(files("easy_vqa") / "data"))


def _as_object(raw: Any) -> Any:
    # [question, answer, image_id] -> an object with named fields; anything else is left for the
    # record builder to reject as malformed.
    return dict(zip(_TRIPLE, raw, strict=True)) if isinstance(raw, list) and len(raw) == 3 else raw


def _read(root: Path, split: str, builder: RecordBuilder) -> list[VQARecord]:
    rows = [
        (location, _as_object(raw))
        for location, raw in json_rows(root / split / "questions.json", f"{split}/questions.json")
    ]
    return build_records(rows, builder, root / split / "images", FIELDS, image_suffix=".png")


@FORMATS.register("easy_vqa")
def load(
    root: Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_invalid: bool = False,
    allow_outside_root: bool = False,
) -> VQASplits:
    """Load easy-VQA from the installed package (`root` None) or a folder in the package's layout."""
    root = require_dir(package_root() if root is None else Path(root), "easy-VQA folder")
    builder = RecordBuilder(root, skip_invalid, allow_outside_root=allow_outside_root)
    train, val = carve_val_by_image(_read(root, "train", builder), val_fraction, seed)
    test = _read(root, "test", builder)
    return VQASplits("easy_vqa", train, val, test, builder.rejected)
