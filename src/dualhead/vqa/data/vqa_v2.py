"""VQA v2 (Goyal et al., 2017): official question and annotation files, COCO images.

``*train2014_questions.json`` / ``*train2014_annotations.json`` (and val2014) beside the image
folders ``train2014/COCO_train2014_<id:012d>.jpg`` and ``val2014/``. The official val split is our
test split (the official test has no public answers); our val is carved from train by image. Each
record keeps the 10 normalised human answers and their soft scores min(n / 3, 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .answers import normalize_answer, vqa_soft_scores
from .loading import (
    FORMATS,
    RecordBuilder,
    answer_type,
    carve_val_by_image,
    expect_list,
    read_json,
    require_dir,
)
from .records import DataError, VQARecord, VQASplits

QUESTION_FIELDS = ("image_id", "question", "question_id")
ANNOTATION_FIELDS = ("multiple_choice_answer", "answers")


def _find(root: Path, pattern: str) -> Path:
    matches = sorted(root.glob(pattern))
    if len(matches) != 1:
        found = ", ".join(path.name for path in matches) or "none"
        raise DataError(f"expected one file matching {pattern} in {root}, found {found}")
    return matches[0]


def _human_answers(answers: Any) -> tuple[str, ...] | None:
    """The normalised human answers of an annotation, or None when they are not [{"answer": ...}]."""
    if not isinstance(answers, list) or not answers:
        return None
    texts = [item.get("answer") if isinstance(item, Mapping) else None for item in answers]
    if not all(isinstance(text, (str, int, float)) and not isinstance(text, bool) for text in texts):
        return None
    return tuple(normalize_answer(text) for text in texts)


def _read(root: Path, split: str, builder: RecordBuilder) -> list[VQARecord]:
    questions_path = _find(root, f"*{split}_questions.json")
    annotations_path = _find(root, f"*{split}_annotations.json")
    questions = expect_list(read_json(questions_path), questions_path, key="questions")
    annotations = expect_list(read_json(annotations_path), annotations_path, key="annotations")
    by_qid = {
        ann["question_id"]: ann
        for ann in annotations
        if isinstance(ann, Mapping) and isinstance(ann.get("question_id"), (int, str))
    }
    records = []
    for index, raw in enumerate(questions):
        qid = raw.get("question_id") if isinstance(raw, Mapping) else None
        source = f"{questions_path.name} record {index} (qid {qid})"
        values = builder.fields(raw, QUESTION_FIELDS, source)
        if values is None:
            continue
        image_id, question, qid = values
        annotation = by_qid.get(qid) if isinstance(qid, (int, str)) else None
        if annotation is None:
            builder.reject(
                source, "missing annotation", f"no annotation of qid {qid!r} in {annotations_path.name}"
            )
            continue
        values = builder.fields(annotation, ANNOTATION_FIELDS, f"{source} in {annotations_path.name}")
        if values is None:
            continue
        answer, answers = values
        all_answers = _human_answers(answers)
        if all_answers is None:
            builder.reject(source, "invalid answers", f"{annotations_path.name} answers {answers!r:.80}")
            continue
        if not isinstance(image_id, int):
            builder.reject(source, "missing image", f"image_id {image_id!r} is not a COCO image number")
            continue
        record = builder.record(
            image=builder.image_path(root / split, f"COCO_{split}_{image_id:012d}.jpg", source),
            question=question,
            answer=answer,
            answer_type=answer_type(annotation.get("answer_type")),
            qid=qid,
            source=source,
            answer_scores=vqa_soft_scores(all_answers),
            all_answers=all_answers,
        )
        if record is not None:
            records.append(record)
    return records


@FORMATS.register("vqa_v2")
def load(
    root: Path,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_invalid: bool = False,
    allow_outside_root: bool = False,
) -> VQASplits:
    """Load VQA v2 from `root`: train2014 gives train and val (by image), val2014 gives test."""
    root = require_dir(Path(root), "VQA v2 folder")
    builder = RecordBuilder(root, skip_invalid, allow_outside_root=allow_outside_root)
    train, val = carve_val_by_image(_read(root, "train2014", builder), val_fraction, seed)
    test = _read(root, "val2014", builder)
    return VQASplits("vqa_v2", train, val, test, builder.rejected)
