"""The VQA training objective: one loss per head, each over the questions labelled for it.

The binary head learns from yes/no questions, the open head from the others, the router from
all; a task with no labelled question in the batch is left out of the returned losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dualhead.config import TrainConfig
from dualhead.mtl.losses import SoftTargetLoss, build_classification_loss, inverse_frequency_weights
from dualhead.vqa.data.answers import AnswerVocab
from dualhead.vqa.data.batching import IGNORE, VQABatch, VQACollator
from dualhead.vqa.data.records import BINARY, OPEN, VQARecord
from dualhead.vqa.model import DualHeadOutput

SINGLE_TASK = "answer"  # the one task of a single-head model


class VQAObjective(nn.Module):
    """Per-task losses (focal or cross-entropy, class weights from training frequencies) + router loss."""

    def __init__(self, config: TrainConfig, vocab: AnswerVocab, train_records: Sequence[VQARecord], single_head: bool, soft_targets: bool):
        super().__init__()
        self.single_head = single_head
        self.soft_targets = soft_targets
        labels = VQACollator(vocab, load_images=False, load_text=False)(train_records) if train_records else None

        def alpha(targets: Tensor | None, num_classes: int) -> Tensor | None:
            if config.class_weights == "none" or targets is None:
                return None
            if config.class_weights != "inverse_frequency":
                raise ValueError(f"unknown train.class_weights {config.class_weights!r}; choose inverse_frequency or none")
            return inverse_frequency_weights(targets.tolist(), num_classes, IGNORE)

        def loss(targets: Tensor | None, num_classes: int) -> nn.Module:
            return build_classification_loss(config.loss, config.focal_gamma, alpha(targets, num_classes), config.label_smoothing)

        if single_head:
            self.single_loss = loss(labels.single_target if labels else None, len(vocab.single_head_answers))
        else:
            self.binary_loss = loss(labels.binary_target if labels else None, 2)
            self.open_loss = loss(labels.open_target if labels else None, max(len(vocab.open_answers), 1))
            self.soft_loss = SoftTargetLoss()
        self.router_loss = nn.CrossEntropyLoss()

    @property
    def tasks(self) -> list[str]:
        return [SINGLE_TASK] if self.single_head else [BINARY, OPEN]

    def forward(self, output: DualHeadOutput, batch: VQABatch) -> tuple[dict[str, Tensor], Tensor | None]:
        """(loss per task present in the batch, router loss or None)."""
        if self.single_head:
            losses = {SINGLE_TASK: self.single_loss(output.open_logits, batch.single_target)}
        else:
            losses = {BINARY: self.binary_loss(output.binary_logits, batch.binary_target)}
            if self.soft_targets and batch.open_soft is not None:
                # open questions with a score on some vocabulary answer (all-zero rows have no label)
                labelled = ~batch.is_binary & (batch.open_soft.sum(-1) > 0)
                losses[OPEN] = self.soft_loss(output.open_logits, batch.open_soft, labelled)
            else:
                losses[OPEN] = self.open_loss(output.open_logits, batch.open_target)
        losses = {task: value for task, value in losses.items() if value is not None}
        router = None
        if output.router_logits is not None:
            router = self.router_loss(output.router_logits.float(), batch.router_target)
        return losses, router


def all_finite(losses: dict[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in losses.values())
