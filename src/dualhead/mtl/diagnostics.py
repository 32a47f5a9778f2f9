"""Gradient conflict between tasks at the shared parameters, and a plot of it over training.

Conflict is measured where the tasks share: the parameters every task's loss flows through. At a
per-sample representation it can be structurally absent (with partial labels, each sample's row
carries one task's gradient, so the tasks' gradients there are orthogonal by construction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from dualhead.core import distributed
from dualhead.mtl.balancers.base import full_precision
from dualhead.mtl.balancers.jacobian import gramian

NORM_PREFIX = "grad_norm/"
COSINE_PREFIX = "cosine/"


def gradient_conflict(losses: Mapping[str, Tensor], params: Sequence[Tensor]) -> dict[str, float]:
    """Per-task gradient norms at the shared parameters `params` and their pairwise cosines.

    Keys: ``"grad_norm/<task>"`` and ``"cosine/<a>~<b>"`` (pairs in the order of `losses`). The graph
    is kept, so the training step's backward can follow. A zero gradient has cosine 0 with all. With
    several processes, each loss carries this process's share and the gradients are summed over them.
    """
    names = list(losses)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("gradient_conflict needs trainable shared parameters; every shared parameter is frozen")
    with full_precision(params[0]):
        grads = [
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, torch.autograd.grad(
                losses[name], params, retain_graph=True, allow_unused=True), strict=True)]
            for name in names
        ]
        # with several processes, each loss carries this process's share: sum them
        distributed.all_reduce_([grad for task in grads for grad in task])
        products = gramian(grads)
        norms = torch.diagonal(products).clamp_min(0).sqrt()
        cosines = products / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
    result = {f"{NORM_PREFIX}{name}": float(norm) for name, norm in zip(names, norms, strict=True)}
    for (i, a), (j, b) in combinations(enumerate(names), 2):
        result[f"{COSINE_PREFIX}{a}~{b}"] = float(cosines[i, j])
    return result


def _series(rows: Sequence[Mapping]) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        if "step" not in row:
            continue
        for key, value in row.items():
            if key.startswith((NORM_PREFIX, COSINE_PREFIX)) and isinstance(value, int | float):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return series


def plot_diagnostics(rows: Sequence[Mapping], png_path: str | Path) -> Path:
    """Draw gradient norms (log scale) and cosines over training steps from metrics rows.

    Rows need ``"step"``; the ``grad_norm/*`` and ``cosine/*`` keys of `gradient_conflict` are drawn,
    other keys and rows without a step are ignored. Returns the PNG's path.
    """
    png_path = Path(png_path)
    series = _series(rows)
    if not series:
        raise ValueError(f"no rows with 'step' and {NORM_PREFIX}* or {COSINE_PREFIX}* keys to plot")
    figure = Figure(figsize=(8, 6), layout="constrained")
    norm_axes, cosine_axes = figure.subplots(2, 1, sharex=True)
    for key, (steps, values) in sorted(series.items()):
        if key.startswith(NORM_PREFIX):
            norm_axes.plot(steps, values, label=key.removeprefix(NORM_PREFIX))
        else:
            cosine_axes.plot(steps, values, label=key.removeprefix(COSINE_PREFIX))
    norm_axes.set_ylabel("gradient norm at shared parameters")
    norms = [v for key, (_, values) in series.items() if key.startswith(NORM_PREFIX) for v in values]
    if norms and min(norms) > 0:
        norm_axes.set_yscale("log")
    cosine_axes.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
    cosine_axes.set_ylim(-1.05, 1.05)
    cosine_axes.set_ylabel("cosine similarity")
    cosine_axes.set_xlabel("step")
    for axes in (norm_axes, cosine_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize="small")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    return png_path
