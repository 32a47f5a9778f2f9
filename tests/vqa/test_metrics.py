"""Metrics from head probabilities: routed vs oracle, per type, out-of-vocabulary, ensembles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualhead.vqa.data.answers import AnswerVocab, vqa_soft_scores
from dualhead.vqa.data.records import VQARecord
from dualhead.vqa.metrics import HeadProbabilities, binary_confusion, score

VOCAB = AnswerVocab(["axial", "brain"])


def record(answer: str, answer_type: str, all_answers: tuple[str, ...] = ()) -> VQARecord:
    return VQARecord(Path("x.png"), "q?", answer, answer_type, "1", "test", answer_scores=vqa_soft_scores(list(all_answers)) if all_answers else None, all_answers=all_answers)


RECORDS = [record("yes", "CLOSED"), record("no", "CLOSED"), record("axial", "CLOSED"), record("brain", "OPEN"), record("liver", "OPEN")]
# binary head: yes, yes(wrong), -, -, - ; open head: brain(wrong for axial), brain, axial(liver is out of vocabulary)
BINARY = torch.tensor([[0.2, 0.8], [0.3, 0.7], [0.9, 0.1], [0.9, 0.1], [0.5, 0.5]])
OPEN = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.4, 0.6], [0.1, 0.9], [0.7, 0.3]])
# router: sends question 3 (axial, an open question) to the binary head by mistake
ROUTER = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.2, 0.8], [0.9, 0.1], [0.9, 0.1]])


def test_routed_and_oracle_accuracy_per_head_and_type():
    metrics, routed = score(HeadProbabilities(BINARY, OPEN, ROUTER), RECORDS, VOCAB)
    assert routed == ["yes", "yes", "no", "brain", "axial"]
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    assert metrics["binary_accuracy"] == pytest.approx(1 / 2) and metrics["open_accuracy"] == pytest.approx(1 / 3)
    assert metrics["oracle_accuracy"] == pytest.approx(2 / 5) and metrics["oracle_open_accuracy"] == pytest.approx(1 / 3)
    assert metrics["router_accuracy"] == pytest.approx(4 / 5)
    assert metrics["type/CLOSED/accuracy"] == pytest.approx(1 / 3) and metrics["type/OPEN/accuracy"] == pytest.approx(1 / 2)
    assert metrics["open_out_of_vocabulary"] == 1, "liver is outside the vocabulary: counted, and wrong"
    assert binary_confusion(HeadProbabilities(BINARY, OPEN, ROUTER), RECORDS) == [[0, 1], [0, 1]]


def test_ensemble_averages_probabilities():
    flipped = HeadProbabilities(BINARY.flip(-1), OPEN, ROUTER)
    mean = HeadProbabilities.average([HeadProbabilities(BINARY, OPEN, ROUTER), flipped])
    torch.testing.assert_close(mean.binary, torch.full_like(BINARY, 0.5))
    with pytest.raises(ValueError, match="different shapes"):
        HeadProbabilities.average([HeadProbabilities(BINARY, OPEN, ROUTER), HeadProbabilities(BINARY, OPEN[:, :1], ROUTER)])


def test_members_with_other_vocabularies_answer_over_their_union():
    """A member that never learned "liver" gives it probability 0; the others keep their columns."""
    other = AnswerVocab(["liver", "axial"])
    union = AnswerVocab(["axial", "brain", "liver"])
    moved = HeadProbabilities(BINARY, torch.tensor([[0.9, 0.1]] * 5), ROUTER).onto(other, union)
    torch.testing.assert_close(moved.open, torch.tensor([[0.1, 0.0, 0.9]] * 5))
    mean = HeadProbabilities.average([HeadProbabilities(BINARY, OPEN, ROUTER).onto(VOCAB, union), moved])
    metrics, routed = score(mean, RECORDS, union)
    assert routed[4] == "liver" and metrics["open_out_of_vocabulary"] == 0
    single = HeadProbabilities(None, torch.tensor([[0.1, 0.2, 0.3, 0.4]]), None).onto(VOCAB, union)  # no, yes, axial, brain
    torch.testing.assert_close(single.open, torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]]))


def test_single_head_and_vqa_accuracy():
    records = [record("axial", None, ("axial",) * 2 + ("brain",) * 8), record("yes", None, ("yes",) * 10)]
    single = torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.1, 0.6, 0.2, 0.1]])  # over no, yes, axial, brain
    metrics, routed = score(HeadProbabilities(None, single, None), records, VOCAB)
    assert routed == ["axial", "yes"] and metrics["accuracy"] == 1.0
    assert metrics["vqa_accuracy"] == pytest.approx((0.6 + 1.0) / 2), "2 of 10 humans said axial: VQA accuracy 0.6"
