"""A task: its loss on the samples labelled for it, and the metrics that judge it.

Partial labels are first-class: a task's `loss` returns None when the batch holds none of its
labelled samples, and the balancer then sees only the tasks present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn


class MetricMeter:
    """Accumulates one task's metrics over batches; `compute` gives ``{metric: value}``."""

    def update(self, prediction: Tensor, batch: Any) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task(nn.Module):
    """Base class of a task. Subclasses set `name`, `metrics` and `primary_metric` and implement `loss`.

    metrics: metric name -> whether higher is better (`delta_m` and model selection read it).
    A Task is an ``nn.Module`` so that loss buffers (class weights) follow the device and dtype.
    """

    name: str = ""
    metrics: Mapping[str, bool] = {}
    primary_metric: str = ""

    def loss(self, prediction: Tensor, batch: Any) -> Tensor | None:
        """Scalar loss over this task's labelled samples in `batch`, or None when there are none."""
        raise NotImplementedError

    def loss_count(self, batch: Any) -> float | None:
        """How many labelled samples (or what total weight) `loss` averages over in `batch`, 0 where it
        returns None. Several training processes weigh their losses by it, so that they compute one
        process's gradient over their union; None (the default): unknown, processes weigh equally."""
        return None

    def meter(self) -> MetricMeter:
        """A fresh metric accumulator for one evaluation pass."""
        raise NotImplementedError

    @property
    def higher_is_better(self) -> bool:
        """Direction of the primary metric."""
        return self.metrics[self.primary_metric]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, primary={self.primary_metric!r}"
