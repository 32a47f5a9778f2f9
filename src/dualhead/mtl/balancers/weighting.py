"""Loss weighting: methods that weigh the task losses from their values alone (no per-task gradients).

Each method is a scalarisation ``objective(values)`` of the present tasks' losses. `LossWeighting`
differentiates it w.r.t. the loss values first (on detached copies: cheap, and it fills the
``.grad`` of the balancer's own parameters), then backpropagates the weighted sum
``sum_t (d objective / d L_t) * L_t`` through the model once. The reported weights are those
derivatives: the effective weight each task's gradient received.

From ``torchjd.scalarization``: UW, IMTL-L (one torchjd scalariser per task, so that an absent task's
parameter gets no gradient), RLW (``Random``), STCH, geometric mean. Ours, because torchjd's versions
assume every task in every batch: DWA and FAMO (their state is per task here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import softmax
from torchjd.scalarization import IMTLL, STCH, UW, GeometricMean, Random

from dualhead.mtl.balancers.base import (
    BALANCERS,
    Balancer,
    BalanceReport,
    accumulate_grad,
    full_precision,
    per_task,
    plain_backward,
)


class LossWeighting(Balancer):
    """Base class: a scalarisation of the present losses, backpropagated through the model once.

    The reported loss is the objective's value (plus the extra loss).
    """

    def objective(self, values: Tensor, tasks: list[str]) -> Tensor:
        """The scalarised objective of the present losses `values` (float32, in `tasks` order)."""
        raise NotImplementedError

    def backward(self, losses, *, shared_params, shared_features=None, extra_loss=None, epoch=0, step=0):
        present = self.present(losses)
        if not present:
            return BalanceReport(loss=plain_backward(None, extra_loss), weights={})
        stacked = torch.stack([losses[task].float() for task in present])
        with full_precision(stacked), torch.enable_grad():
            values = stacked.detach().requires_grad_()
            objective = self.objective(values, present)
            objective.backward()  # -> values.grad, and .grad of this balancer's parameters
        weights = values.grad
        plain_backward((weights * stacked).sum(), extra_loss)
        total = float(objective.detach()) + (float(extra_loss.detach()) if extra_loss is not None else 0.0)
        return BalanceReport(loss=total, weights=dict(zip(present, weights.tolist(), strict=True)))


@BALANCERS.register("uw")
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), torchjd's ``UW`` per task.

    ``sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t`` with learnable log-variances ``s_t`` (parameters,
    stepped by the trainer's optimiser at `lr`); weight ``0.5 * exp(-s_t)``.
    """

    def __init__(self, tasks: Sequence[str], lr: float = 1e-2):
        super().__init__(tasks)
        self.lr = lr
        self.scalarizers = nn.ModuleDict({task: UW(()) for task in self.tasks})

    def objective(self, values, tasks):
        return sum(self.scalarizers[task](value) for task, value in zip(tasks, values, strict=True))


@BALANCERS.register("imtl_l")
class IMTLLossWeighting(LossWeighting):
    """IMTL-L, the loss-balancing half of Impartial MTL (Liu et al., ICLR 2021), torchjd's ``IMTLL`` per task.

    ``sum_t exp(s_t) * L_t - s_t`` with learnable scales ``s_t`` (parameters, stepped by the
    trainer's optimiser at `lr`); weight ``exp(s_t)``.
    """

    def __init__(self, tasks: Sequence[str], lr: float = 1e-2):
        super().__init__(tasks)
        self.lr = lr
        self.scalarizers = nn.ModuleDict({task: IMTLL(()) for task in self.tasks})

    def objective(self, values, tasks):
        return sum(self.scalarizers[task](value) for task, value in zip(tasks, values, strict=True))


@BALANCERS.register("rlw")
class RandomLossWeighting(LossWeighting):
    """Random loss weighting (Lin et al., TMLR 2022), torchjd's ``Random``: softmax of normal draws each step."""

    def objective(self, values, tasks):
        return Random()(values)


@BALANCERS.register("stch")
class SmoothTchebycheff(LossWeighting):
    """Smooth Tchebycheff scalarisation (Lin et al., ICML 2024), torchjd's ``STCH``.

    ``mu * log sum_t exp(lambda_t * (L_t - z_t) / mu)``: a smooth maximum of the weighted losses.
    preference: ``{task: lambda}`` (default equal), renormalised over the present tasks to sum to 1.
    reference: ``{task: z}``, the ideal point (default none).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        mu: float = 1.0,
        preference: Mapping[str, float] | None = None,
        reference: Mapping[str, float] | None = None,
    ):
        super().__init__(tasks)
        if mu <= 0:
            raise ValueError(f"STCH's mu must be > 0, got {mu}")
        self.mu = mu
        self.preference = per_task(preference, self.tasks, "preference")
        self.reference = per_task(reference, self.tasks, "reference")

    def objective(self, values, tasks):
        preference = values.new_tensor([self.preference.get(task, 1.0) for task in tasks])
        reference = values.new_tensor([self.reference.get(task, 0.0) for task in tasks])
        return STCH(self.mu, weights=preference / preference.sum(), reference=reference)(values)


@BALANCERS.register("geometric")
class GeometricLoss(LossWeighting):
    """Geometric mean of the losses (GLS; Chennupati et al., CVPR-W 2019), torchjd's ``GeometricMean``.

    Weight ``GM / (m * L_t)``: scale-invariant, like a sum of log-losses.
    """

    def objective(self, values, tasks):
        return GeometricMean()(values)


@BALANCERS.register("dwa")
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019), with a per-task loss history.

    ``lambda_t = m * softmax_t(w_t / T)`` over the m present tasks, ``w_t = L_t(e-1) / L_t(e-2)``
    from the task's average loss over the steps of the last two epochs in which it was present;
    ``w_t = 1`` until a task has two such epochs (so the first epochs weigh uniformly). The trainer
    calls `set_epoch` at each epoch start, which closes the previous epoch's averages.
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks)
        if temperature <= 0:
            raise ValueError(f"DWA's temperature must be > 0, got {temperature}")
        self.temperature = temperature
        n = len(self.tasks)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_loss_sum", torch.zeros(n))
        self.register_buffer("epoch_steps", torch.zeros(n, dtype=torch.long))
        self.register_buffer("history", torch.ones(n, 2))  # [older, newer] epoch averages
        self.register_buffer("history_length", torch.zeros(n, dtype=torch.long))

    def set_epoch(self, epoch: int) -> None:
        if epoch == int(self.epoch):
            return
        seen = self.epoch_steps > 0
        averages = self.epoch_loss_sum[seen] / self.epoch_steps[seen]
        self.history[seen] = torch.stack([self.history[seen, 1], averages], dim=1)
        self.history_length[seen] = (self.history_length[seen] + 1).clamp(max=2)
        self.epoch_loss_sum.zero_()
        self.epoch_steps.zero_()
        self.epoch.fill_(epoch)

    def objective(self, values, tasks):
        index = self.task_index(tasks)
        history = self.history[index].to(values)
        ready = self.history_length[index].to(values.device) >= 2
        rates = torch.where(ready, history[:, 1] / history[:, 0], torch.ones_like(values))
        weights = len(tasks) * softmax(rates / self.temperature, dim=0)
        self.epoch_loss_sum[index] += values.detach().to(self.epoch_loss_sum)
        self.epoch_steps[index] += 1
        return (weights * values).sum()


@BALANCERS.register("famo")
class FAMO(LossWeighting):
    """FAMO (Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023), per task.

    Objective ``c * sum_t z_t * log(L_t - b_t + eps)``, ``z = softmax(w)`` over the present tasks,
    ``c = 1 / sum_t (z_t / (L_t - b_t + eps))`` held constant, so the update is a convex combination
    of the task gradients, with weights ``c * z_t / (L_t - b_t + eps)``.

    The logits ``w_t`` are parameters stepped by the trainer's optimiser (Adam in the paper, at
    `lr`); `backward` writes FAMO's logit gradient into their ``.grad``: ``d(z . delta)/dw + gamma * w``
    with ``delta_t = log(L_t(prev) - b_t + eps) - log(L_t(now) - b_t + eps)`` over the tasks present in
    both this and the previous call (the paper's regularisation ``gamma`` is added here, so the
    trainer's group needs no weight decay). Unlike the paper, which evaluates the same batch again
    after the model update, ``delta`` compares consecutive steps' batches: no extra forward pass,
    at the price of noise (this assumes one `backward` per optimiser step). Losses must stay above
    `min_losses` (default 0).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: Mapping[str, float] | None = None,
        eps: float = 1e-8,
    ):
        super().__init__(tasks)
        self.lr = lr
        self.gamma = gamma
        self.eps = eps
        self.logits = nn.ParameterDict({task: nn.Parameter(torch.zeros(())) for task in self.tasks})
        bounds = per_task(min_losses, self.tasks, "min_losses")
        self.register_buffer("min_losses", torch.tensor([float(bounds.get(t, 0.0)) for t in self.tasks]))
        self.register_buffer("previous_losses", torch.full((len(self.tasks),), float("nan")))

    def objective(self, values, tasks):
        index = self.task_index(tasks)
        shifted = values - self.min_losses[index].to(values) + self.eps
        previous = self.previous_losses[index].to(values) - self.min_losses[index].to(values) + self.eps
        both = [i for i in range(len(tasks)) if not torch.isnan(previous[i])]
        if len(both) >= 2:
            logits = [self.logits[tasks[i]] for i in both]
            delta = torch.log(previous[both]) - torch.log(shifted[both].detach())
            grads = torch.autograd.grad(softmax(torch.stack(logits), dim=0), logits, grad_outputs=delta)
            for logit, grad in zip(logits, grads, strict=True):
                accumulate_grad(logit, grad + self.gamma * logit.detach())
        self.previous_losses.fill_(float("nan"))
        self.previous_losses[index] = values.detach().to(self.previous_losses)
        z = softmax(torch.stack([self.logits[task] for task in tasks]).detach().to(values), dim=0)
        normaliser = (z / shifted).sum().detach()
        return (z / normaliser * torch.log(shifted)).sum()
