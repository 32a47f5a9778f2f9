"""VQA metrics from head probabilities: per head, per answer type, routed and oracle-routed.

"Routed" answers each question with the head the router picks (what a deployed model does);
"oracle" uses the true question type. A test answer outside the training vocabulary can never be
predicted by a classifier: it counts as wrong and the count is reported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from dualhead.vqa.data.answers import AnswerVocab, vqa_accuracy
from dualhead.vqa.data.records import BINARY, OPEN, YES_NO, VQARecord


@dataclass
class HeadProbabilities:
    """Softmax outputs for a list of records (rows align with the records).

    single-head models have `binary` None and `open` over ``vocab.single_head_answers``.
    """

    binary: Tensor | None  # [N, 2]
    open: Tensor  # [N, K]
    router: Tensor | None  # [N, 2]
    experts: Tensor | None = None  # [N, E] the experts' gate (route question_type: over the types)

    @staticmethod
    def from_output(output) -> HeadProbabilities:
        """Softmax of a `DualHeadOutput`'s logits, in float32 on the CPU."""

        def softmax(logits: Tensor | None) -> Tensor | None:
            return None if logits is None else logits.float().softmax(-1).cpu()

        return HeadProbabilities(
            binary=softmax(output.binary_logits), open=softmax(output.open_logits), router=softmax(output.router_logits),
            experts=softmax(output.gate_logits),
        )

    @staticmethod
    def concat(parts: Sequence[HeadProbabilities]) -> HeadProbabilities:
        def cat(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return HeadProbabilities(binary=cat("binary"), open=cat("open"), router=cat("router"), experts=cat("experts"))

    def onto(self, vocab: AnswerVocab, target: AnswerVocab) -> HeadProbabilities:
        """The same probabilities over `target`'s answers, a superset of `vocab`'s (the answers it
        lacks get probability 0): ensemble members trained on different splits answer in one space."""
        single = self.binary is None
        names = vocab.single_head_answers if single else vocab.open_answers
        index = target.single_index if single else target.open_index
        expanded = self.open.new_zeros(self.open.shape[0], len(target.single_head_answers if single else target.open_answers))
        expanded[:, torch.tensor([index(answer) for answer in names], dtype=torch.long)] = self.open
        return replace(self, open=expanded)

    @staticmethod
    def average(members: Sequence[HeadProbabilities]) -> HeadProbabilities:
        """Ensemble: the mean of the members' probabilities."""

        def mean(name: str) -> Tensor | None:
            values = [getattr(m, name) for m in members]
            if any(v is None for v in values):
                if not all(v is None for v in values):
                    raise ValueError(f"ensemble members disagree on whether they have a {name} head")
                return None
            if len({v.shape for v in values}) > 1:
                raise ValueError(f"ensemble members' {name} heads have different shapes: {[tuple(v.shape) for v in values]}")
            return torch.stack(values).mean(0)

        # The gates only report which expert answered: kept when every member has the same experts.
        gates = [m.experts for m in members]
        same_experts = all(g is not None for g in gates) and len({g.shape for g in gates}) == 1
        experts = torch.stack(gates).mean(0) if same_experts else None
        return HeadProbabilities(binary=mean("binary"), open=mean("open"), router=mean("router"), experts=experts)


def route_to_binary(probs: HeadProbabilities, vocab: AnswerVocab) -> Tensor:
    """Which rows the binary head answers: the router's call; without a router, the more confident
    head; never, for a single-head model; always, for a model with no open answers (trained on
    yes/no questions only)."""
    if probs.binary is None:
        return torch.zeros(probs.open.shape[0], dtype=torch.bool)
    if not vocab.open_answers:
        return torch.ones(probs.open.shape[0], dtype=torch.bool)
    if probs.router is not None:
        return probs.router.argmax(-1) == 1
    return probs.binary.amax(-1) >= probs.open.amax(-1)


def predict_answers(probs: HeadProbabilities, vocab: AnswerVocab, to_binary: Tensor) -> list[str]:
    """The answer string per row, taken from the head each row is routed to."""
    if probs.binary is None:
        return [vocab.single_head_answers[i] for i in probs.open.argmax(-1).tolist()]
    binary = [YES_NO[i] for i in probs.binary.argmax(-1).tolist()]
    open_answers = [vocab.open_answers[i] if vocab.open_answers else "" for i in probs.open.argmax(-1).tolist()]
    return [b if routed else o for b, o, routed in zip(binary, open_answers, to_binary.tolist(), strict=True)]


def _accuracy(correct: Sequence[bool]) -> float | None:
    return sum(correct) / len(correct) if correct else None


def score(
    probs: HeadProbabilities, records: Sequence[VQARecord], vocab: AnswerVocab, question_types: Sequence[str] = ()
) -> tuple[dict, list[str]]:
    """All metrics for one split, and the routed prediction per record. `question_types`: the classes of
    a type-routed model's gate, scored as ``question_type_accuracy`` over the records of a known type."""
    is_binary = torch.tensor([r.task == BINARY for r in records], dtype=torch.bool)
    routed_binary = route_to_binary(probs, vocab)
    routed = predict_answers(probs, vocab, routed_binary)
    oracle = predict_answers(probs, vocab, is_binary)
    truth = [r.answer for r in records]
    routed_ok = [p == t for p, t in zip(routed, truth, strict=True)]
    oracle_ok = [p == t for p, t in zip(oracle, truth, strict=True)]
    tasks = [r.task for r in records]

    metrics: dict = {
        "count": len(records),
        "accuracy": _accuracy(routed_ok),
        "binary_accuracy": _accuracy([ok for ok, t in zip(routed_ok, tasks, strict=True) if t == BINARY]),
        "open_accuracy": _accuracy([ok for ok, t in zip(routed_ok, tasks, strict=True) if t == OPEN]),
        "oracle_accuracy": _accuracy(oracle_ok),
        "oracle_binary_accuracy": _accuracy([ok for ok, t in zip(oracle_ok, tasks, strict=True) if t == BINARY]),
        "oracle_open_accuracy": _accuracy([ok for ok, t in zip(oracle_ok, tasks, strict=True) if t == OPEN]),
        "binary_count": tasks.count(BINARY),
        "open_count": tasks.count(OPEN),
        "open_out_of_vocabulary": sum(1 for r in records if r.task == OPEN and vocab.open_index(r.answer) is None),
    }
    if probs.router is not None and probs.binary is not None:
        metrics["router_accuracy"] = float((routed_binary == is_binary).float().mean()) if records else None
    if probs.experts is not None and question_types:
        metrics.update(question_type_metrics(probs.experts, records, question_types))
    by_type: dict[str, list[bool]] = defaultdict(list)
    for ok, record in zip(routed_ok, records, strict=True):
        if record.answer_type:
            by_type[record.answer_type].append(ok)
    for answer_type, oks in sorted(by_type.items()):
        metrics[f"type/{answer_type}/accuracy"] = _accuracy(oks)
        metrics[f"type/{answer_type}/count"] = len(oks)
    if any(r.all_answers for r in records):
        metrics["vqa_accuracy"] = sum(vqa_accuracy(p, r.all_answers or (r.answer,)) for p, r in zip(routed, records, strict=True)) / len(records)
    return metrics, routed


def question_type_metrics(gates: Tensor, records: Sequence[VQARecord], question_types: Sequence[str]) -> dict:
    """The type classifier's accuracy over the records whose type it knows, and how many those are."""
    rows = {name: row for row, name in enumerate(question_types)}
    predicted = gates.argmax(-1).tolist()
    hits = [predicted[i] == rows[r.question_type] for i, r in enumerate(records) if r.question_type in rows]
    return {"question_type_accuracy": _accuracy(hits), "question_type_count": len(hits)}


def binary_confusion(probs: HeadProbabilities, records: Sequence[VQARecord]) -> list[list[int]]:
    """2x2 confusion matrix of the binary head on the yes/no questions: rows truth, columns prediction."""
    matrix = [[0, 0], [0, 0]]
    if probs.binary is None:
        return matrix
    predictions = probs.binary.argmax(-1).tolist()
    for record, predicted in zip(records, predictions, strict=True):
        if record.task == BINARY:
            matrix[YES_NO.index(record.answer)][predicted] += 1
    return matrix


def format_metrics_table(metrics: dict, title: str = "") -> str:
    """A markdown table of the accuracy figures (percent) and counts."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        if value is None:
            text = "n/a"
        elif "accuracy" in key:
            text = f"{100 * value:.2f}%"
        else:
            text = str(value)
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines)
