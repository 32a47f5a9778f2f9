"""VQA data: one loader per dataset format, answers and vocabulary, images.

``load_splits(config.data)`` picks the loader named by ``config.format`` from `FORMATS`.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from ..config import DataConfig
from . import easy_vqa, jsonl, pathvqa, slake, vqa_rad, vqa_v2  # noqa: F401  (each registers its format)
from .answers import AnswerVocab, normalize_answer, vqa_accuracy, vqa_soft_scores
from .images import ImagePreprocessor, ImageStore, load_rgb, question_allows_flip
from .loading import FORMATS
from .records import BINARY, OPEN, TASKS, YES_NO, DataError, Rejection, VQARecord, VQASplits

# Formats that need no --root: their data ships with an installed package.
EMBEDDED = frozenset({"easy_vqa"})


def load_splits(config: DataConfig, seed: int = 0) -> VQASplits:
    """Load the dataset `config` names; options a format does not have must stay at their defaults."""
    loader = FORMATS.lookup(config.format)
    if config.root is None and config.format not in EMBEDDED:
        raise ValueError(f"data format {config.format!r} needs its folder: pass --root DIR (data.root=DIR)")
    accepted = inspect.signature(loader).parameters
    if config.lang != "en" and "lang" not in accepted:
        raise ValueError(f"data.lang={config.lang!r} applies to slake only, not {config.format!r}")
    options = {"lang": config.lang, "val_fraction": config.val_fraction, "seed": seed,
               "skip_invalid": config.skip_invalid, "allow_outside_root": config.allow_outside_root}  # fmt: skip
    root = Path(config.root) if config.root is not None else None
    splits = loader(root, **{name: value for name, value in options.items() if name in accepted})
    if config.tasks is not None:
        splits = keep_tasks(splits, config.tasks)
    return verify_images(splits, config.skip_invalid) if config.verify_images else splits


def keep_tasks(splits: VQASplits, tasks: list[str]) -> VQASplits:
    """The splits with only the questions of `tasks` (validation is carved before this, so it holds
    the same questions of those tasks as an all-task run with the same seed)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"data.tasks={list(tasks)!r}: choose one or more of {', '.join(TASKS)}")
    wanted = set(tasks)

    def keep(records: list[VQARecord]) -> list[VQARecord]:
        return [r for r in records if r.task in wanted]

    return dataclasses.replace(splits, train=keep(splits.train), val=keep(splits.val), test=keep(splits.test))


def verify_images(splits: VQASplits, skip_invalid: bool = False) -> VQASplits:
    """Decode each distinct image once; a corrupt one raises a DataError naming it and a record
    that uses it, or, with `skip_invalid`, its records are dropped and counted as rejections."""
    broken: dict[Path, str] = {}
    checked: set[Path] = set()
    for records in (splits.train, splits.val, splits.test):
        for record in records:
            if record.image in checked:
                continue
            checked.add(record.image)
            try:
                load_rgb(record.image, record.source)
            except DataError as err:
                if not skip_invalid:
                    raise
                broken[record.image] = str(err)
    if not broken:
        return splits
    kept = {name: [r for r in splits.split(name) if r.image not in broken] for name in ("train", "val", "test")}
    rejected = [Rejection(r.source, "corrupt image", broken[r.image])
                for name in ("train", "val", "test") for r in splits.split(name) if r.image in broken]
    return VQASplits(splits.name, kept["train"], kept["val"], kept["test"], splits.rejected + rejected)


__all__ = [
    "BINARY",
    "EMBEDDED",
    "FORMATS",
    "OPEN",
    "TASKS",
    "YES_NO",
    "AnswerVocab",
    "DataError",
    "ImagePreprocessor",
    "ImageStore",
    "Rejection",
    "VQARecord",
    "VQASplits",
    "load_rgb",
    "load_splits",
    "normalize_answer",
    "question_allows_flip",
    "vqa_accuracy",
    "verify_images",
    "vqa_soft_scores",
]
