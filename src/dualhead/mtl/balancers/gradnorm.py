"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018); torchjd has none, so it is ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dualhead.mtl.balancers.base import (
    BALANCERS,
    Balancer,
    BalanceReport,
    accumulate_grad,
    full_precision,
    plain_backward,
)
from dualhead.mtl.balancers.jacobian import (
    check_features,
    check_mode,
    feature_jacobian,
    feature_norms,
    params_jacobian,
)


@BALANCERS.register("gradnorm")
class GradNorm(Balancer):
    """The model trains on ``sum_t w_t * L_t``; the task weights ``w_t`` follow GradNorm's gradient.

    With ``G_t = ||d(w_t L_t)/dW||`` (W: the shared representation, ``mode="representation"``, or
    every shared parameter, ``mode="parameters"``), ``r_t = (L_t / L_t(0)) / mean_j(L_j / L_j(0))``
    and the target ``mean_j(G_j) * r_t ** alpha`` held constant, the paper's
    ``L_grad = sum_t |G_t - target_t|`` has ``dL_grad/dw_t = sign(G_t - target_t) * ||dL_t/dW||``.
    `backward` writes it into the ``.grad`` of the weights (parameters, stepped by the trainer's
    optimiser at `lr`); at the next call the weights the optimiser moved are rescaled to their sum
    before the step, so the weights keep summing to the number of tasks (the paper's
    renormalisation) and an absent task's weight never changes. Means run over the present tasks;
    ``L_t(0)`` is the task's first observed loss. One present task: its weighted loss, no update.
    Weights are floored at `min_weight` before renormalising, so they stay positive.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        alpha: float = 1.5,
        lr: float = 0.025,
        mode: str = "parameters",
        parallel_chunk_size: int | None = 1,
        min_weight: float = 1e-3,
    ):
        super().__init__(tasks)
        self.alpha = alpha
        self.lr = lr
        self.mode = check_mode(mode)
        self.parallel_chunk_size = parallel_chunk_size
        self.min_weight = min_weight
        n = len(self.tasks)
        self.weights = nn.ParameterDict({task: nn.Parameter(torch.ones(())) for task in self.tasks})
        self.register_buffer("initial_losses", torch.full((n,), float("nan")))
        self.register_buffer(
            "stepped", torch.zeros(n, dtype=torch.bool)
        )  # weights given a gradient last call
        self.register_buffer("stepped_sum", torch.zeros(()))  # their sum before the optimiser step

    @torch.no_grad()
    def renormalise(self) -> None:
        """Rescale the weights updated since the last call to their pre-update sum (idempotent)."""
        tasks = [task for task, stepped in zip(self.tasks, self.stepped.tolist(), strict=True) if stepped]
        if not tasks:
            return
        for task in tasks:
            self.weights[task].clamp_(min=self.min_weight)
        scale = self.stepped_sum / sum(self.weights[task] for task in tasks)
        for task in tasks:
            self.weights[task].mul_(scale)
        self.stepped.zero_()

    def backward(self, losses, *, shared_params, shared_features=None, extra_loss=None, epoch=0, step=0):
        self.renormalise()
        present = self.present(losses)
        if not present:
            return BalanceReport(loss=plain_backward(None, extra_loss), weights={})
        index = self.task_index(present).to(self.initial_losses.device)
        tensors = [losses[task] for task in present]
        values = torch.stack([loss.detach().float() for loss in tensors]).to(self.initial_losses)
        unset = torch.isnan(self.initial_losses[index])
        self.initial_losses[index[unset]] = values[unset]
        weights = torch.stack([self.weights[task].detach() for task in present])
        if len(present) >= 2:
            features = check_features(shared_features, "gradnorm")
            with full_precision(features):
                if self.mode == "representation":
                    jacobian = feature_jacobian(
                        tensors, features, parallel_chunk_size=self.parallel_chunk_size
                    )
                    norms = feature_norms(jacobian).to(weights)
                else:
                    params = [p for p in shared_params if p.requires_grad]
                    jacobian = params_jacobian(tensors, params, parallel_chunk_size=self.parallel_chunk_size)
                    norms = jacobian.norm(dim=1).to(weights)
            ratios = values / self.initial_losses[index]
            target = (weights * norms).mean() * (ratios / ratios.mean()) ** self.alpha
            grads = torch.sign(weights * norms - target) * norms
            for task, grad in zip(present, grads, strict=True):
                accumulate_grad(self.weights[task], grad)
            self.stepped[index] = True
            self.stepped_sum.fill_(float(weights.sum()))
        objective = sum(w * loss for w, loss in zip(weights.to(tensors[0].device), tensors, strict=True))
        total = plain_backward(objective, extra_loss)
        return BalanceReport(loss=total, weights=dict(zip(present, weights.tolist(), strict=True)))
