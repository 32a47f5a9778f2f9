"""SLAKE (Liu et al., 2021): ``train.json``, ``validate.json``, ``test.json`` beside ``imgs/``.

Each record has ``img_name`` (relative to ``imgs/``), ``question``, ``answer``, ``q_lang``
(``en``/``zh``), ``answer_type`` (OPEN/CLOSED) and ``content_type`` (Organ, Position, Abnormality, ...:
kept, upper-cased, as the question type). SLAKE's own validation split is used.
"""

from __future__ import annotations

from pathlib import Path

from .loading import FORMATS, FieldNames, RecordBuilder, build_records, json_rows, require_dir
from .records import VQASplits

LANGUAGES = ("en", "zh", "all")
FIELDS = FieldNames(image="img_name", question_type="content_type")


@FORMATS.register("slake")
def load(
    root: Path, *, lang: str = "en", skip_invalid: bool = False, allow_outside_root: bool = False
) -> VQASplits:
    """Load SLAKE from `root`; `lang` keeps English ("en"), Chinese ("zh") or both ("all")."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown SLAKE language {lang!r}; choose one of {', '.join(LANGUAGES)}")
    root = require_dir(Path(root), "SLAKE folder")
    builder = RecordBuilder(root, skip_invalid, allow_outside_root=allow_outside_root)
    train, val, test = (
        build_records(
            json_rows(root / filename),
            builder,
            root / "imgs",
            FIELDS,
            also_required=("q_lang",),
            keep=lambda raw: lang == "all" or raw["q_lang"] == lang,
        )
        for filename in ("train.json", "validate.json", "test.json")
    )
    return VQASplits("slake", train, val, test, builder.rejected)
