"""Gradient aggregation: the task losses' Jacobian, aggregated by a torchjd aggregator into one update.

Every method here is a torchjd aggregator (``torchjd.aggregation``) except "nsgs", which is a
torchjd ``GramianWeightedAggregator`` over our own weighting. `JacobianAggregation` adds what
torchjd leaves to the caller:

- partial labels: only the tasks present in the batch form the Jacobian; one present task is a
  plain backward of its loss. An aggregator is built per combination of present tasks (per-task
  options such as ``pref_vector={"binary": 1, "open": 2}`` are sliced to it); the per-task state
  of the stateful ones (GradVac's pairwise cosine targets, Nash-MTL's warm start) lives in this
  module's buffers, indexed by task, so it survives absent tasks and checkpoints.
- the Jacobian w.r.t. every shared parameter (``mode="parameters"``, the default: where tasks
  share, whatever their labels) or, cheaper, w.r.t. the last shared representation
  (``mode="representation"``: only where every row of it feeds every task, as in dense tasks on
  the same image; with partial labels it cannot show conflict, and the Trainer refuses it); heads
  always get their own task's plain gradient
  (see `dualhead.mtl.balancers.jacobian`, also for several processes: the per-task gradients are
  all-reduced before they are aggregated, so every process aggregates what one process would see).
- ``update_every=k``: aggregate every k-th step, and in between use the last weights as a plain
  weighted sum (only one pass through the heads), for the expensive methods.

The reported weights are the aggregator's weights on the task gradients where it has a weighting
(all but GradDrop and ConFIG); otherwise the least-squares coefficients of the aggregated update
in the span of the task gradients (exact where the update lies in that span, as ConFIG's does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor
from torchjd.aggregation import (
    IMTLG,
    MGDA,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    GradDrop,
    GradVac,
    GramianWeightedAggregator,
    NashMTL,
    PCGrad,
    UPGrad,
    WeightedAggregator,
    Weighting,
)

from dualhead.core import distributed
from dualhead.mtl.balancers.base import BALANCERS, Balancer, BalanceReport, full_precision, plain_backward
from dualhead.mtl.balancers.jacobian import (
    accumulate_combination,
    accumulate_flat,
    backward_through_features,
    check_features,
    check_mode,
    feature_gramian,
    feature_jacobian,
    gather_columns,
    gramian,
    task_gradients,
)


class NormalizedSumWeighting(Weighting):
    """Weights ``1 / ||g_i||`` from the Gramian: the sum of unit-normalised task gradients (NSGS).

    Every present task then moves the shared representation by the same amount whatever its loss
    scale; the update's norm is at most the number of tasks, so pair it with an Adam-type optimiser
    (or scale the learning rate). A zero gradient gets weight 0.
    """

    def __init__(self, eps: float = 1e-12):
        super().__init__()
        self.eps = eps

    def forward(self, gramian: Tensor, /) -> Tensor:
        norms = torch.diagonal(gramian).clamp_min(0).sqrt()
        return torch.where(norms > self.eps, 1 / norms.clamp_min(self.eps), torch.zeros_like(norms))


def nsgs(eps: float = 1e-12) -> GramianWeightedAggregator:
    """Normalised-gradient sum as a torchjd aggregator."""
    return GramianWeightedAggregator(NormalizedSumWeighting(eps))


#: Registry name -> torchjd aggregator class (or factory) and its default options.
AGGREGATORS: dict[str, tuple[Callable[..., Aggregator], dict]] = {
    "pcgrad": (PCGrad, {}),
    "mgda": (MGDA, {}),
    "cagrad": (CAGrad, {"c": 0.4}),  # the paper's c for its multi-task experiments
    "nash_mtl": (NashMTL, {}),
    "imtl_g": (IMTLG, {}),
    "gradvac": (GradVac, {}),
    "graddrop": (GradDrop, {}),
    "aligned_mtl": (AlignedMTL, {}),
    "upgrad": (UPGrad, {}),
    "dualproj": (DualProj, {}),
    "config": (ConFIG, {}),
    "nsgs": (nsgs, {}),
}


def span_coefficients(jacobian: Tensor, direction: Tensor) -> Tensor:
    """Least-squares ``w`` with ``w @ jacobian ~= direction`` (through the Gramian, so it is cheap)."""
    gramian = jacobian @ jacobian.T
    return torch.linalg.pinv(gramian) @ (jacobian @ direction)


class JacobianAggregation(Balancer):
    """Aggregate the present tasks' Jacobian with a torchjd aggregator (see the module docstring).

    aggregator: a name in `AGGREGATORS`, or a torchjd `Aggregator` used for every combination of
        present tasks (it must then accept any number of rows, and its state is its own).
    mode: "representation" (Jacobian at ``shared_features``) or "parameters" (at ``shared_params``).
    update_every: recompute the aggregation weights every this many steps (and whenever the set of
        present tasks changes); in between, the last weights make a plain weighted sum.
    parallel_chunk_size: torchjd's option; the default 1 runs one backward per task: ``torch.vmap``
        (None) fails on some models under bf16 autocast on CPU (dtype mismatch in the batched backward).
    **options: the aggregator's own options (torchjd's names); a ``{task: value}`` mapping is a
        per-task option (e.g. ``pref_vector``, ``leak``) and must name every task.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        aggregator: str | Aggregator,
        mode: str = "parameters",
        update_every: int = 1,
        parallel_chunk_size: int | None = 1,
        **options,
    ):
        super().__init__(tasks)
        self.mode = check_mode(mode)
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.update_every = update_every
        self.parallel_chunk_size = parallel_chunk_size
        n = len(self.tasks)
        if isinstance(aggregator, Aggregator):
            if options:
                raise ValueError(f"options {sorted(options)} apply to named aggregators only")
            self.name = type(aggregator).__name__
            self._shared: Aggregator | None = aggregator
        else:
            if aggregator not in AGGREGATORS:
                raise ValueError(f"unknown aggregator {aggregator!r}; choose one of {sorted(AGGREGATORS)}")
            self.name = aggregator
            self._shared = None
            self._factory, defaults = AGGREGATORS[aggregator]
            self._options = {**defaults, **options}
            for key, value in self._options.items():
                if isinstance(value, Mapping) and set(value) != set(self.tasks):
                    raise ValueError(
                        f"per-task option {key!r} must name every task {self.tasks}, got {sorted(value)}"
                    )
            self._aggregators: dict[tuple[str, ...], Aggregator] = {}
            try:  # fail early on bad options or missing optional dependencies
                probe = self._build(self.tasks, torch.device("cpu"))
            except TypeError as error:
                raise ValueError(f"aggregator {aggregator!r}: {error}") from None
            if isinstance(probe, GradVac):
                self.register_buffer("gradvac_targets", torch.zeros(n, n))
            if isinstance(probe, NashMTL):
                self.register_buffer("nash_alpha", torch.ones(n))
        self.register_buffer("cached_weights", torch.zeros(n))
        self.register_buffer("cached_tasks", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("steps_since_update", torch.zeros((), dtype=torch.long))

    def _build(self, tasks: Sequence[str], device: torch.device) -> Aggregator:
        options = {
            key: torch.tensor([float(value[t]) for t in tasks], device=device)
            if isinstance(value, Mapping)
            else value
            for key, value in self._options.items()
        }
        if self._factory is NashMTL:
            options["n_tasks"] = len(tasks)
        return self._factory(**options)

    def _aggregator(self, tasks: tuple[str, ...], device: torch.device) -> Aggregator:
        if self._shared is not None:
            return self._shared
        if tasks not in self._aggregators:
            self._aggregators[tasks] = self._build(tasks, device)
        return self._aggregators[tasks]

    # torchjd keeps GradVac's targets and Nash-MTL's warm start inside the aggregator, for a fixed
    # number of rows; we keep them per task and hand the present tasks' slice in and out.
    def _load_state(self, aggregator: Aggregator, index: Tensor) -> None:
        if isinstance(aggregator, GradVac):
            weighting = aggregator.gramian_weighting
            weighting._phi_t = self.gradvac_targets[index][:, index].cpu().clone()
            weighting._state_key = (len(index), torch.float32)
        elif isinstance(aggregator, NashMTL):
            aggregator.weighting.prvs_alpha = self.nash_alpha[index].cpu().numpy().copy()

    def _store_state(self, aggregator: Aggregator, index: Tensor) -> None:
        if isinstance(aggregator, GradVac):
            targets = aggregator.gramian_weighting._phi_t.to(self.gradvac_targets)
            self.gradvac_targets[index.unsqueeze(1), index] = targets
        elif isinstance(aggregator, NashMTL):
            alpha = torch.as_tensor(aggregator.weighting.prvs_alpha, dtype=torch.float32)
            self.nash_alpha[index] = alpha.to(self.nash_alpha)

    def combine(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Aggregate a ``[m, n]`` Jacobian of `tasks`: the update direction and the task weights."""
        aggregator = self._aggregator(tuple(tasks), jacobian.device)
        index = self.task_index(tasks)
        self._load_state(aggregator, index)
        if isinstance(aggregator, WeightedAggregator):
            weights = aggregator.weighting(jacobian)
            direction = weights @ jacobian
        else:
            direction = aggregator(jacobian)
            weights = span_coefficients(jacobian, direction)
        self._store_state(aggregator, index)
        return direction, weights

    def gramian_weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor | None:
        """The task weights from the Gramian alone, for methods whose weights depend only on it
        (None for the others, which need the Jacobian itself)."""
        aggregator = self._aggregator(tuple(tasks), gramian.device)
        if not isinstance(aggregator, GramianWeightedAggregator):
            return None
        index = self.task_index(tasks)
        self._load_state(aggregator, index)
        weights = aggregator.gramian_weighting(gramian)
        self._store_state(aggregator, index)
        return weights

    def combine_features(self, jacobian: Tensor, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
        """`combine` for a per-sample Jacobian, of which this process holds its samples' columns: the
        weights from the global Gramian where they depend on it alone, else from the gathered Jacobian;
        the direction on this process's columns."""
        if not distributed.is_distributed():
            return self.combine(jacobian, tasks)
        weights = self.gramian_weights(feature_gramian(jacobian), tasks)
        if weights is not None:
            return weights @ jacobian, weights
        full, start = gather_columns(jacobian)
        direction, weights = self.combine(full, tasks)
        return direction[start : start + jacobian.shape[1]], weights

    def _due(self, mask: Tensor) -> bool:
        return not torch.equal(mask, self.cached_tasks) or int(self.steps_since_update) >= self.update_every

    def backward(self, losses, *, shared_params, shared_features=None, extra_loss=None, epoch=0, step=0):
        present = self.present(losses)
        tensors = [losses[task] for task in present]
        if len(present) < 2:
            total = plain_backward(tensors[0] if tensors else None, extra_loss)
            return BalanceReport(loss=total, weights=dict.fromkeys(present, 1.0))
        features = check_features(shared_features, self.name)
        index = self.task_index(present)
        mask = torch.zeros_like(self.cached_tasks)
        mask[index] = True
        with full_precision(features):
            if self._due(mask):
                weights = self._aggregate(tensors, present, features, shared_params, extra_loss)
                self.cached_weights.zero_()
                self.cached_weights[index] = weights.to(self.cached_weights)
                self.cached_tasks.copy_(mask)
                self.steps_since_update.zero_()
            else:
                weights = self.cached_weights[index].to(features.device)
                weighted = sum(w * loss for w, loss in zip(weights, tensors, strict=True))
                (direction,) = torch.autograd.grad(weighted, features, retain_graph=True)
                backward_through_features(tensors, features, direction.reshape(-1).float(), extra_loss)
            self.steps_since_update += 1
        total = sum(float(loss.detach()) for loss in tensors)
        if extra_loss is not None:
            total += float(extra_loss.detach())
        return BalanceReport(loss=total, weights=dict(zip(present, weights.tolist(), strict=True)))

    def _aggregate(self, tensors, present, features, shared_params, extra_loss) -> Tensor:
        chunk = self.parallel_chunk_size
        if self.mode == "representation":
            jacobian = feature_jacobian(tensors, features, parallel_chunk_size=chunk)
            direction, weights = self.combine_features(jacobian, present)
            backward_through_features(tensors, features, direction, extra_loss)
        else:
            # One ordinary backward per task; most methods need only the Gramian of the task
            # gradients, so no [m, n] Jacobian is built for them.
            params = [p for p in shared_params if p.requires_grad]
            grads = task_gradients(tensors, params, retain_graph=extra_loss is not None)
            weights = self.gramian_weights(gramian(grads), present)
            if weights is not None:
                accumulate_combination(params, grads, weights)
            else:
                jacobian = torch.cat([torch.stack([g[i].reshape(-1).float() for g in grads]) for i in range(len(params))], dim=1)
                direction, weights = self.combine(jacobian, present)
                accumulate_flat(params, direction)
            plain_backward(None, extra_loss)
        return weights


for _name in AGGREGATORS:
    BALANCERS.register(_name, partial(JacobianAggregation, aggregator=_name))
