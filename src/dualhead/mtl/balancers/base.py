"""The one interface every loss-balancing or gradient-aggregation method implements.

The trainer computes one loss per task present in the batch and hands them over; the balancer
turns them into gradients on the model's parameters (it replaces ``loss.backward()``) and reports
the task weights it used. Tasks absent from a batch are simply missing from `losses`.

Learnable parts of a balancer follow one rule: **its ``nn.Parameter``s are stepped by the
trainer's optimiser** (add ``balancer.parameters()`` as a param group with ``lr=balancer.lr`` and
``weight_decay=0``, outside gradient clipping); ``backward`` accumulates their gradient (the
objective's gradient, or the method's own update direction) into ``.grad``. Per-task parameters
are separate tensors, so a task absent from a batch gets no gradient and the optimiser leaves it
alone. Statistics a method updates itself (loss histories, moving averages) are buffers. Both
travel in the state dict.

With several processes (`dualhead.core.distributed`), every process's balancer gets the same tasks,
each loss valued over the global batch, with this process's share of its gradient; the trainer sums
the model's ``.grad`` over processes after ``backward``. A method that weighs losses by their values
therefore needs nothing more: its weights, state and own parameters' gradients come out the same on
every process (random draws too: the trainer seeds them alike). Per-task gradients are all-reduced
where `dualhead.mtl.balancers.jacobian` forms them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dualhead.core.registry import Registry


@dataclass
class BalanceReport:
    """What one balancing step did: the combined loss (for logging) and the weight per present task."""

    loss: float
    weights: dict[str, float]
    extras: dict[str, float] = field(default_factory=dict)


class Balancer(nn.Module):
    """Base class: turns per-task losses into parameter gradients.

    Subclasses are `nn.Module`s so that learnable or stateful parts (uncertainty weighting's
    log-variances, DWA's loss history) travel in the checkpoint's state dict.
    """

    #: Learning rate for this balancer's own parameters (None when it has none).
    lr: float | None = None

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)
        if (
            not self.tasks
            or len(set(self.tasks)) != len(self.tasks)
            or any("." in t or not t for t in self.tasks)
        ):
            raise ValueError(f"a balancer needs distinct, non-empty task names without '.', got {self.tasks}")

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        shared_params: Sequence[Tensor],
        shared_features: Tensor | None = None,
        extra_loss: Tensor | None = None,
        epoch: int = 0,
        step: int = 0,
    ) -> BalanceReport:
        """Accumulate gradients into ``.grad`` of the parameters, like ``loss.backward()``.

        losses: scalar loss per task present in this batch.
        shared_params: the parameters every task shares (the backbone).
        shared_features: the last shared representation (fused features), for cheap Jacobians.
        extra_loss: a loss added unweighted outside balancing (e.g. the question-type router's).
        """
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Hook for per-epoch state (schedules, DWA's loss history)."""

    def present(self, losses: Mapping[str, Tensor]) -> list[str]:
        """The tasks of `losses` in this balancer's task order; unknown names or non-scalars are errors."""
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise ValueError(f"losses for unknown tasks {unknown}; this balancer's tasks are {self.tasks}")
        for task, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"the loss of task {task!r} must be a scalar tensor, got {loss!r}")
        return [task for task in self.tasks if task in losses]

    def task_index(self, tasks: Sequence[str]) -> Tensor:
        """Positions of `tasks` in ``self.tasks`` (to index per-task buffers)."""
        return torch.tensor([self.tasks.index(task) for task in tasks], dtype=torch.long)


def plain_backward(objective: Tensor | None, extra_loss: Tensor | None) -> float:
    """Backward of ``objective + extra_loss`` (either may be None); returns the combined value."""
    terms = [t for t in (objective, extra_loss) if t is not None]
    if not terms:
        return 0.0
    total = sum(terms[1:], terms[0])
    if total.requires_grad:
        total.backward()
    return float(total.detach())


def full_precision(reference: Tensor) -> torch.autocast:
    """A context that turns autocast off on `reference`'s device, for weight and Jacobian arithmetic."""
    return torch.autocast(reference.device.type, enabled=False)


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """Add `grad` to ``param.grad`` (as autograd does), creating it if absent."""
    grad = grad.detach().to(dtype=param.dtype).reshape(param.shape)
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad += grad


def per_task(values: Mapping[str, float] | None, tasks: Sequence[str], option: str) -> Mapping[str, float]:
    """Check a per-task option (``{task: value}``) names only known tasks."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(tasks))
    if unknown:
        raise ValueError(f"option {option!r} names unknown tasks {unknown}; tasks are {list(tasks)}")
    return values


class FixedWeights(Balancer):
    """Weighted sum of task losses; weights may follow a per-epoch schedule (the reference design's).

    schedule: {first_epoch: {task: weight}}; the entry with the largest first_epoch <= epoch applies.
    A task absent from the batch takes no part; present tasks keep their scheduled weights.
    """

    def __init__(self, tasks: Sequence[str], schedule: Mapping[int, Mapping[str, float]] | None = None):
        super().__init__(tasks)
        schedule = schedule or {0: {task: 1.0 for task in self.tasks}}
        self.schedule = {int(epoch): dict(weights) for epoch, weights in sorted(schedule.items())}
        if 0 not in self.schedule:
            raise ValueError(f"task weight schedule must start at epoch 0, got epochs {list(self.schedule)}")
        for epoch, weights in self.schedule.items():
            unknown = set(weights) - set(self.tasks)
            if unknown:
                raise ValueError(
                    f"task weight schedule at epoch {epoch} names unknown tasks {sorted(unknown)}"
                )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def weights_at(self, epoch: int) -> dict[str, float]:
        start = max(e for e in self.schedule if e <= epoch)
        return {task: float(self.schedule[start].get(task, 1.0)) for task in self.tasks}

    def backward(self, losses, *, shared_params, shared_features=None, extra_loss=None, epoch=0, step=0):
        weights = self.weights_at(self.epoch)
        total = sum(weights[task] * loss for task, loss in losses.items())
        if extra_loss is not None:
            total = total + extra_loss
        if isinstance(total, Tensor) and total.requires_grad:
            total.backward()
        used = {task: weights[task] for task in losses}
        return BalanceReport(loss=float(total.detach()) if isinstance(total, Tensor) else 0.0, weights=used)


#: Registry name -> constructor ``(tasks, **options) -> Balancer``; each method's module registers it.
BALANCERS: Registry[Callable[..., Balancer]] = Registry("balancer")
BALANCERS.register("fixed", FixedWeights)


def build_balancer(name: str, tasks: Sequence[str], **options) -> Balancer:
    """Build a balancer by its registry name (``train.balancer`` in the config)."""
    cls = BALANCERS.lookup(name)
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted = [p for p in parameters if p != "tasks"]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"balancer {name!r} takes no option(s) {unknown}; its options are {accepted}")
    return cls(tasks, **options)
