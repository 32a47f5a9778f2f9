"""The VQA tasks: each head's loss over the questions labelled for it, and its accuracy.

The binary head learns from yes/no questions, the open head from the others (a single-head model
has one task over all answers). A task with no labelled question in a batch returns None and is
left out of the balancing; the router's loss over all questions is the experiment's auxiliary loss.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dualhead.core.registry import Registry
from dualhead.core.task import MetricMeter, Task
from dualhead.mtl.losses import SoftTargetLoss, build_classification_loss, inverse_frequency_weights
from dualhead.vqa.config import VQATrainConfig
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.data.batching import IGNORE, VQABatch, VQACollator
from dualhead.vqa.data.records import BINARY, OPEN, VQARecord
from dualhead.vqa.model import SINGLE_TASK

VQA_TASKS: Registry[type[Task]] = Registry("VQA task")


class TargetAccuracy(MetricMeter):
    """Accuracy of the arg-max over the rows whose target is not IGNORE."""

    def __init__(self, key: str, target: str):
        self.key, self.target = key, target
        self.correct = self.total = 0

    def update(self, prediction: Tensor, batch: VQABatch) -> None:
        target = getattr(batch, self.target)
        labelled = target != IGNORE
        self.correct += int((prediction.argmax(-1)[labelled] == target[labelled]).sum())
        self.total += int(labelled.sum())

    def compute(self) -> dict[str, float]:
        return {self.key: self.correct / self.total if self.total else float("nan")}


class ClassificationTask(Task):
    """Focal (or cross-entropy) loss over this task's questions, class weights from training frequencies."""

    target: str = ""  # the VQABatch field holding this task's class index (IGNORE elsewhere)

    def __init__(self, config: VQATrainConfig, train_targets: Tensor | None, num_classes: int):
        super().__init__()
        self.criterion = build_classification_loss(
            config.loss, config.focal_gamma, class_weights(config, train_targets, num_classes), config.label_smoothing
        )

    def loss(self, prediction: Tensor, batch: VQABatch) -> Tensor | None:
        return self.criterion(prediction, getattr(batch, self.target))

    def loss_count(self, batch: VQABatch) -> int:
        return int((getattr(batch, self.target) != IGNORE).sum())

    def meter(self) -> MetricMeter:
        return TargetAccuracy(self.primary_metric, self.target)


@VQA_TASKS.register(BINARY)
class BinaryTask(ClassificationTask):
    """The yes/no head's task."""

    name = BINARY
    target = "binary_target"
    metrics = {"binary_accuracy": True}
    primary_metric = "binary_accuracy"


@VQA_TASKS.register(OPEN)
class OpenTask(ClassificationTask):
    """The open-ended head's task; with soft targets (VQA v2's ten answers) a soft-score loss."""

    name = OPEN
    target = "open_target"
    metrics = {"open_accuracy": True}
    primary_metric = "open_accuracy"

    def __init__(self, config: VQATrainConfig, train_targets: Tensor | None, num_classes: int, soft_targets: bool = False):
        super().__init__(config, train_targets, num_classes)
        self.soft = SoftTargetLoss() if soft_targets else None

    def loss(self, prediction: Tensor, batch: VQABatch) -> Tensor | None:
        if self.soft is not None and batch.open_soft is not None:
            # open questions with a score on some vocabulary answer (all-zero rows have no label)
            labelled = ~batch.is_binary & (batch.open_soft.sum(-1) > 0)
            return self.soft(prediction, batch.open_soft, labelled)
        return super().loss(prediction, batch)

    def loss_count(self, batch: VQABatch) -> int:
        if self.soft is not None and batch.open_soft is not None:
            return int((~batch.is_binary & (batch.open_soft.sum(-1) > 0)).sum())
        return super().loss_count(batch)


@VQA_TASKS.register(SINGLE_TASK)
class SingleAnswerTask(ClassificationTask):
    """The one head of the 'Single Head' ablation, over the union of all answers."""

    name = SINGLE_TASK
    target = "single_target"
    metrics = {"single_accuracy": True}
    primary_metric = "single_accuracy"


def class_weights(config: VQATrainConfig, targets: Tensor | None, num_classes: int) -> Tensor | None:
    if config.class_weights == "none" or targets is None:
        return None
    if config.class_weights != "inverse_frequency":
        raise ValueError(f"unknown train.class_weights {config.class_weights!r}; choose inverse_frequency or none")
    return inverse_frequency_weights(targets.tolist(), num_classes, IGNORE)


def build_tasks(
    config: VQATrainConfig, vocab: AnswerVocab, train_records: Sequence[VQARecord], single_head: bool, soft_targets: bool
) -> list[Task]:
    """The tasks of a Dual-Head (or single-head) model, class weights from `train_records`."""
    labels = VQACollator(vocab, load_images=False, load_text=False)(train_records) if train_records else None
    if single_head:
        return [SingleAnswerTask(config, labels.single_target if labels else None, len(vocab.single_head_answers))]
    return [
        BinaryTask(config, labels.binary_target if labels else None, 2),
        OpenTask(config, labels.open_target if labels else None, max(len(vocab.open_answers), 1), soft_targets),
    ]


def router_loss(router_logits: Tensor, batch: VQABatch) -> Tensor:
    """Cross-entropy of the question-type router over every question (yes/no or not)."""
    return nn.functional.cross_entropy(router_logits.float(), batch.router_target)

