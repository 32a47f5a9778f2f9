"""Frozen encoders never change, so their features are computed once per distinct input and reused.

`model_inputs` is the one place that turns a `VQABatch` into the model's keyword arguments,
taking cached features where a cache has them and pixels / tokens otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dualhead.vqa.data.batching import VQABatch
from dualhead.vqa.data.images import ImageStore
from dualhead.vqa.data.records import VQARecord
from dualhead.vqa.model import DualHeadVQA


class EncoderFeatureCache:
    """Pooled features of the frozen encoder(s) for every distinct image / question of some records."""

    def __init__(self) -> None:
        self.image_rows: dict[Path, int] = {}
        self.image_features: Tensor | None = None
        self.question_rows: dict[str, int] = {}
        self.text_features: Tensor | None = None

    @property
    def has_images(self) -> bool:
        return self.image_features is not None

    @property
    def has_text(self) -> bool:
        return self.text_features is not None

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: DualHeadVQA,
        records: Iterable[VQARecord],
        store: ImageStore,
        device: torch.device,
        autocast: AbstractContextManager,
        images: bool,
        texts: bool,
        batch_size: int = 64,
        progress: bool = True,
    ) -> EncoderFeatureCache:
        """Encode each distinct image (and question) once, with the encoders in eval mode."""
        cache = cls()
        records = list(records)
        was_training = model.training
        model.eval()
        try:
            if images:
                sources = {r.image: r.source for r in reversed(records)}
                paths = list(sources)
                cache.image_rows = {path: row for row, path in enumerate(paths)}
                chunks = []
                for start in tqdm(range(0, len(paths), batch_size), desc="caching image features", disable=not progress):
                    pixels = torch.stack([store.get(p, sources[p]) for p in paths[start : start + batch_size]])
                    with autocast:
                        chunks.append(model.encode_images(store.preprocessor.normalize(pixels).to(device)).float())
                cache.image_features = torch.cat(chunks)
            if texts:
                questions = list(dict.fromkeys(r.question for r in records))
                cache.question_rows = {q: row for row, q in enumerate(questions)}
                chunks = []
                for start in tqdm(range(0, len(questions), batch_size), desc="caching question features", disable=not progress):
                    tokens = model.text.tokenize(questions[start : start + batch_size])
                    with autocast:
                        chunks.append(model.encode_questions(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float())
                cache.text_features = torch.cat(chunks)
        finally:
            model.train(was_training)
        return cache


def model_inputs(batch: VQABatch, cache: EncoderFeatureCache | None = None) -> dict[str, Tensor]:
    """Keyword arguments for `DualHeadVQA.forward` (batch already on the model's device)."""
    inputs = {"image_index": batch.image_index, "question_index": batch.question_index}
    if cache is not None and cache.has_images:
        rows = torch.tensor([cache.image_rows[path] for path in batch.images], device=cache.image_features.device)
        inputs["image_features"] = cache.image_features[rows]
    else:
        inputs["pixel_values"] = batch.pixel_values
    if cache is not None and cache.has_text:
        rows = torch.tensor([cache.question_rows[q] for q in batch.questions], device=cache.text_features.device)
        inputs["text_features"] = cache.text_features[rows]
    else:
        inputs["input_ids"] = batch.input_ids
        inputs["attention_mask"] = batch.attention_mask
    return inputs
