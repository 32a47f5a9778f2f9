"""Classification losses for partially labelled multi-task batches.

Every loss takes the full batch and a target in which unlabelled samples carry `ignore_index`;
it averages over the labelled samples only and returns None when the batch has none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t).

    gamma=0 with alpha=None is plain cross-entropy. `alpha` holds one weight per class; the mean
    is taken over labelled samples (as RetinaNet normalises by the number of positives).
    """

    def __init__(self, gamma: float = 2.5, alpha: Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("alpha", alpha.float() if alpha is not None else None, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor | None:
        labelled = target != self.ignore_index
        if not labelled.any():
            return None
        logits, target = logits[labelled].float(), target[labelled]
        log_probs = logits.log_softmax(dim=-1)
        log_p_true = log_probs.gather(1, target[:, None]).squeeze(1)
        nll = -log_p_true
        if self.label_smoothing:
            nll = (1 - self.label_smoothing) * nll - self.label_smoothing * log_probs.mean(dim=-1)
        loss = (1 - log_p_true.exp()).clamp_min(0).pow(self.gamma) * nll if self.gamma else nll
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


class SoftTargetLoss(nn.Module):
    """Binary cross-entropy against soft scores per answer (the VQA v2 recipe, Teney et al. 2018).

    Rows whose scores are all zero and whose hard target is ignored are unlabelled.
    """

    def forward(self, logits: Tensor, scores: Tensor, labelled: Tensor) -> Tensor | None:
        if not labelled.any():
            return None
        logits, scores = logits[labelled].float(), scores[labelled]
        return F.binary_cross_entropy_with_logits(logits, scores, reduction="sum") / logits.shape[0]


def inverse_frequency_weights(targets: Sequence[int], num_classes: int, ignore_index: int = -100) -> Tensor:
    """Class weights proportional to 1 / frequency, normalised to mean 1 over the classes present.

    Classes never seen get weight 0 contribution-free (they have no samples); weights are clipped
    to [0.1, 10] x the mean so that a class seen once does not dominate.
    """
    counts = torch.zeros(num_classes)
    for target in targets:
        if target != ignore_index:
            counts[target] += 1
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = 1.0 / counts[present]
    weights[present] /= weights[present].mean()
    weights[present] = weights[present].clamp(0.1, 10.0)
    weights[~present] = 1.0
    return weights


def build_classification_loss(kind: str, gamma: float, alpha: Tensor | None, label_smoothing: float = 0.0) -> FocalLoss:
    """`focal` or `ce` (cross-entropy = focal with gamma 0), each with optional class weights."""
    if kind not in ("focal", "ce"):
        raise ValueError(f"unknown loss {kind!r}; choose 'focal' or 'ce'")
    return FocalLoss(gamma=gamma if kind == "focal" else 0.0, alpha=alpha, label_smoothing=label_smoothing)
