"""Grouped batches: each distinct image encoded once, same outputs as per-question encoding."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dualhead.vqa.config import DataConfig
from dualhead.vqa.data import AnswerVocab, ImageStore, load_splits
from dualhead.vqa.data.batching import IGNORE, GroupedBatchSampler, VQACollator
from dualhead.vqa.model import DualHeadVQA
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def shapes(shapes_root):
    splits = load_splits(DataConfig(format="jsonl", root=str(shapes_root)))
    return splits.train, AnswerVocab.from_records(splits.train)


def test_sampler_covers_every_record_once_with_few_questions_per_image(shapes):
    records, _ = shapes
    sampler = GroupedBatchSampler(records, batch_size=8, questions_per_image=2, seed=3)
    questions_per_image = Counter(r.image for r in records)
    chunks = sum(-(-n // 2) for n in questions_per_image.values())
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(records)))
        assert len(batches) == sampler.epoch_length == len(sampler)
        encodings = 0
        for batch in batches:
            per_image = Counter(records[i].image for i in batch)
            assert len(per_image) >= 2, "one image alone would break batch norm"
            encodings += len(per_image)
        assert encodings <= chunks < len(records), "images are encoded once per batch, not once per question"
    sampler.set_epoch(1)
    again = GroupedBatchSampler(records, batch_size=8, questions_per_image=2, seed=3)
    again.set_epoch(1)
    assert list(sampler) == list(again), "the same seed and epoch give the same batches"
    again.set_epoch(2)
    assert list(sampler) != list(again), "another epoch reshuffles"
    full = (sampler.set_epoch(1), list(sampler))[1]
    sampler.set_epoch(1, skip=3)
    assert list(sampler) == full[3:] and len(sampler) == len(full) - 3


def test_grouped_batch_encodes_each_image_once_and_matches_per_question_encoding(shapes):
    records, vocab = shapes
    model = DualHeadVQA(tiny_model_config(), vocab).eval()
    collate = VQACollator(vocab, ImageStore(model.preprocessor), model.text.tokenize)
    sampler = GroupedBatchSampler(records, batch_size=12, questions_per_image=3, seed=0)
    seen = []
    hook = model.vision.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    for indices in list(sampler)[:3]:
        batch = collate([records[i] for i in indices])
        distinct = len({records[i].image for i in indices})
        assert len(batch.images) == distinct < len(indices)
        seen.clear()
        with torch.no_grad():
            grouped = model(pixel_values=batch.pixel_values, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            image_index=batch.image_index, question_index=batch.question_index)
        assert seen == [distinct], "the vision encoder saw each distinct image once"
        with torch.no_grad():
            per_question = model(pixel_values=batch.pixel_values[batch.image_index], input_ids=batch.input_ids[batch.question_index],
                                 attention_mask=batch.attention_mask[batch.question_index])
        assert seen[-1] == len(indices)
        torch.testing.assert_close(grouped.open_logits, per_question.open_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grouped.binary_logits, per_question.binary_logits, rtol=1e-4, atol=1e-5)
    hook.remove()


def test_targets_follow_the_task_of_each_answer(shapes):
    records, _ = shapes
    vocab = AnswerVocab(["red", "circle"])  # other open answers fall outside this vocabulary
    batch = VQACollator(vocab, load_images=False, load_text=False)(records[:30])
    for row, record in enumerate(batch.records):
        if record.answer in ("yes", "no"):
            assert batch.binary_target[row] == ("no", "yes").index(record.answer) and batch.open_target[row] == IGNORE
            assert batch.router_target[row] == 1
        else:
            expected = vocab.open_index(record.answer)
            assert batch.open_target[row] == (IGNORE if expected is None else expected) and batch.binary_target[row] == IGNORE
            assert batch.router_target[row] == 0
    assert (batch.open_target == IGNORE).sum() > (batch.binary_target != IGNORE).sum(), "out-of-vocabulary answers are ignored"
