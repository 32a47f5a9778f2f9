"""Batches that list each distinct image and question once, with an index per question.

VQA datasets ask about ten questions per image (easy-VQA asks only 107 distinct questions), so
the encoders run once per distinct input in a batch rather than once per question.
`GroupedBatchSampler` draws several questions of the same image into one batch to make that pay.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from dualhead.core.distributed import ShardableBatchSampler
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.data.images import ImagePreprocessor, ImageStore, question_allows_flip
from dualhead.vqa.data.records import BINARY, OPEN, VQARecord

IGNORE = -100  # target of a question that a head does not learn from


class GroupedBatchSampler(ShardableBatchSampler):
    """Yields batches of record indices that group several questions of the same image.

    Every record appears exactly once per epoch. Each image's questions are shuffled and cut into
    chunks of at most `questions_per_image`; the chunks are shuffled and packed into batches of at
    most `batch_size` questions. `set_epoch` reshuffles deterministically; with several processes
    (`shard`), each takes every N-th batch, so a step's global batch is N batches.
    """

    def __init__(self, records: Sequence[VQARecord], batch_size: int, questions_per_image: int = 4, shuffle: bool = True, seed: int = 0):
        if batch_size < 1 or questions_per_image < 1:
            raise ValueError(f"batch_size ({batch_size}) and questions_per_image ({questions_per_image}) must be >= 1")
        by_image: dict[Path, list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            by_image[record.image].append(index)
        self.groups = list(by_image.values())
        self.batch_size = batch_size
        # at least two images per batch: one image alone breaks batch norm in training
        self.questions_per_image = max(1, min(questions_per_image, batch_size // 2))
        self.shuffle = shuffle
        super().__init__(seed)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        chunks = []
        for group in self.groups:
            group = list(group)
            if self.shuffle:
                rng.shuffle(group)
            chunks += [group[i : i + self.questions_per_image] for i in range(0, len(group), self.questions_per_image)]
        if self.shuffle:
            rng.shuffle(chunks)
        batches: list[list[list[int]]] = [[]]  # each batch: its chunks (one chunk = one image)
        for chunk in chunks:
            if sum(map(len, batches[-1])) + len(chunk) > self.batch_size:
                batches.append([])
            batches[-1].append(chunk)
        if len(batches) > 1 and len(batches[-1]) == 1:  # one image alone breaks batch norm in training
            last = batches.pop()
            batches[-1] += last
        return [[index for chunk in batch for index in chunk] for batch in batches if batch]


@dataclass
class VQABatch:
    """A batch: distinct images and questions once each, per-question indices and targets."""

    records: list[VQARecord]
    images: list[Path]  # distinct images, in row order of pixel_values
    questions: list[str]  # distinct questions, in row order of input_ids
    image_index: Tensor  # [B] row of each question's image
    question_index: Tensor  # [B] row of each question's text
    binary_target: Tensor  # [B] 0 = no, 1 = yes; IGNORE for open questions
    open_target: Tensor  # [B] open-vocabulary index; IGNORE for yes/no or out-of-vocabulary answers
    single_target: Tensor  # [B] index into the union of all answers (single-head mode)
    router_target: Tensor  # [B] 1 for yes/no questions, 0 otherwise
    open_soft: Tensor | None = None  # [B, N] soft scores (VQA v2), None for single-answer datasets
    # [B] index of each question's type in the model's type vocabulary (IGNORE: none, or unseen in
    # training); None when the collator was given no type vocabulary
    type_target: Tensor | None = None
    pixel_values: Tensor | None = None  # [n_images, 3, S, S]
    input_ids: Tensor | None = None  # [n_questions, L]
    attention_mask: Tensor | None = None

    @property
    def is_binary(self) -> Tensor:
        return self.router_target.bool()

    def to(self, device: torch.device | str) -> VQABatch:
        """Move every tensor to `device` (non-blocking where possible)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
        return VQABatch(**moved)


class VQACollator:
    """Builds a `VQABatch` from records: dedups images and questions, decodes, tokenizes, labels.

    `load_images=False` / `load_text=False` skip pixels / tokens (training on cached encoder features).
    `question_types` (the model's type vocabulary) adds each question's `type_target`.
    """

    def __init__(
        self,
        vocab: AnswerVocab,
        store: ImageStore | None = None,
        tokenize: Callable[[list[str]], dict[str, Tensor]] | None = None,
        augment: bool = False,
        soft_targets: bool = False,
        load_images: bool = True,
        load_text: bool = True,
        question_types: Sequence[str] | None = None,
    ):
        if (load_images and store is None) or (load_text and tokenize is None):
            raise ValueError("VQACollator needs an image store to load images and a tokenizer to load text")
        self.vocab = vocab
        self.store = store
        self.tokenize = tokenize
        self.augment = augment
        self.soft_targets = soft_targets
        self.load_images = load_images
        self.load_text = load_text
        self.type_rows = {name: row for row, name in enumerate(question_types)} if question_types else None

    @property
    def preprocessor(self) -> ImagePreprocessor:
        return self.store.preprocessor

    def __call__(self, records: Sequence[VQARecord]) -> VQABatch:
        records = list(records)
        image_rows: dict[Path, int] = {}
        question_rows: dict[str, int] = {}
        for record in records:
            image_rows.setdefault(record.image, len(image_rows))
            question_rows.setdefault(record.question, len(question_rows))
        batch = VQABatch(
            records=records,
            images=list(image_rows),
            questions=list(question_rows),
            image_index=torch.tensor([image_rows[r.image] for r in records]),
            question_index=torch.tensor([question_rows[r.question] for r in records]),
            binary_target=torch.tensor([self.vocab.binary_index(r.answer) if r.task == BINARY else IGNORE for r in records]),
            open_target=torch.tensor([self._open_index(r) for r in records]),
            single_target=torch.tensor([_or_ignore(self.vocab.single_index(r.answer)) for r in records]),
            router_target=torch.tensor([int(r.task == BINARY) for r in records]),
            open_soft=self._soft_scores(records) if self.soft_targets else None,
            type_target=self._type_targets(records),
        )
        if self.load_images:
            self._add_pixels(batch)
        if self.load_text:
            tokens = self.tokenize(batch.questions)
            batch.input_ids, batch.attention_mask = tokens["input_ids"], tokens["attention_mask"]
        return batch

    def _open_index(self, record: VQARecord) -> int:
        return _or_ignore(self.vocab.open_index(record.answer)) if record.task == OPEN else IGNORE

    def _type_targets(self, records: list[VQARecord]) -> Tensor | None:
        if self.type_rows is None:
            return None
        return torch.tensor([self.type_rows.get(r.question_type, IGNORE) for r in records])

    def _soft_scores(self, records: list[VQARecord]) -> Tensor:
        scores = torch.zeros(len(records), max(len(self.vocab.open_answers), 1))
        for row, record in enumerate(records):
            if record.task != OPEN:
                continue
            for answer, score in (record.answer_scores or {record.answer: 1.0}).items():
                index = self.vocab.open_index(answer)
                if index is not None:
                    scores[row, index] = score
        return scores

    def _add_pixels(self, batch: VQABatch) -> None:
        sources = {record.image: record.source for record in reversed(batch.records)}
        pixels = torch.stack([self.store.get(path, sources[path]) for path in batch.images])
        if self.augment:
            allow_flip = {path: True for path in batch.images}
            for record in batch.records:
                allow_flip[record.image] = allow_flip[record.image] and question_allows_flip(record.question)
            pixels = self.preprocessor.augment(pixels, [allow_flip[path] for path in batch.images])
        batch.pixel_values = self.preprocessor.normalize(pixels)


def _or_ignore(index: int | None) -> int:
    return IGNORE if index is None else index
