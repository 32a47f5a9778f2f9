"""Per-task gradients for the gradient-based methods, built on torchjd's autojac.

Two places to differentiate (the ``mode`` option of the gradient methods):

- ``"parameters"`` (the default): each task's gradient w.r.t. every shared parameter, one ordinary
  backward per task (`task_gradients`); heads get their own task's gradient on the way. Methods
  whose weights depend only on the Gramian (most of torchjd's) get it parameter by parameter
  (`gramian`) and never see a flat ``[m, n]`` Jacobian. This is where tasks share whatever their
  labels.
- ``"representation"``: the Jacobian of the task losses w.r.t. the last shared representation
  (`feature_jacobian`, one pass through the heads per task); the combined gradient at the
  representation is then backpropagated through the backbone once (`backward_through_features`).
  Only meaningful where every row of the representation feeds every task (dense tasks on the same
  image): with partial labels (a VQA question carries one task's label) the tasks' gradients sit on
  disjoint rows, are orthogonal by construction, and the methods reduce to the plain sum.

Several processes (`dualhead.core.distributed`): every process must aggregate the per-task gradients
one process would see over the global batch, so they are all-reduced before aggregation, here, where
they are formed: `task_gradients`, `params_jacobian` and `shared_jacobian` return the sums over every
process (each process's losses carry its share of the global mean, see `global_mean_shares`). Updates
built from them are the same on every process, so `accumulate_combination` and `accumulate_flat` add
each process's ``1 / N`` share, and the trainer's one sum all-reduce of ``.grad`` (which also carries
the heads' and the auxiliary loss's local gradients) restores them once. A per-sample Jacobian
(`feature_jacobian`) stays local: different processes' samples are different columns of the global
one, whose Gramian is the sum of the local Gramians (`feature_gramian`), or which is gathered whole
(`gather_columns`) for the methods that need more than the Gramian.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchjd.autojac import jac, mtl_backward

from dualhead.core import distributed
from dualhead.mtl.balancers.base import accumulate_grad

MODES = ("representation", "parameters")


def check_mode(mode: str) -> str:
    """Validate the ``mode`` option."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_features(features: Tensor | None, method: str) -> Tensor:
    """Gradient methods need the last shared representation, and it must be part of the graph."""
    if features is None:
        raise ValueError(f"{method!r} needs shared_features (the last shared representation)")
    if not features.requires_grad:
        raise ValueError(f"{method!r}: shared_features does not require grad, so nothing is shared")
    return features


def feature_jacobian(
    losses: Sequence[Tensor], features: Tensor, *, parallel_chunk_size: int | None = 1
) -> Tensor:
    """The ``[m, features.numel()]`` float32 Jacobian of `losses` w.r.t. `features`; the graph is kept.
    With several processes: this process's columns of the global Jacobian."""
    rows = jac(list(losses), [features], retain_graph=True, parallel_chunk_size=parallel_chunk_size)[0]
    return rows.reshape(len(losses), -1).float()


def feature_gramian(jacobian: Tensor) -> Tensor:
    """The ``[m, m]`` Gramian of the global per-sample Jacobian from this process's columns of it."""
    result = jacobian @ jacobian.T
    distributed.all_reduce_([result])
    return result


def feature_norms(jacobian: Tensor) -> Tensor:
    """Each task's gradient norm at the (global) per-sample representation."""
    if not distributed.is_distributed():
        return jacobian.norm(dim=1)
    return torch.diagonal(feature_gramian(jacobian)).clamp_min(0).sqrt()


def gather_columns(jacobian: Tensor) -> tuple[Tensor, int]:
    """The global per-sample Jacobian (every process's columns, in rank order) and where this
    process's columns start in it."""
    parts = distributed.all_gather_rows(jacobian.T.contiguous())
    start = sum(part.shape[0] for part in parts[: distributed.rank()])
    return torch.cat(parts).T, start


def params_jacobian(
    losses: Sequence[Tensor], params: Sequence[Tensor], *, parallel_chunk_size: int | None = None
) -> Tensor:
    """The ``[m, n]`` float32 Jacobian of `losses` w.r.t. `params` (flattened, concatenated; summed over
    processes); the graph is kept."""
    blocks = jac(list(losses), list(params), retain_graph=True, parallel_chunk_size=parallel_chunk_size)
    jacobian = torch.cat([block.reshape(len(losses), -1).float() for block in blocks], dim=1)
    distributed.all_reduce_([jacobian])
    return jacobian


def shared_jacobian(
    losses: Sequence[Tensor],
    features: Tensor,
    params: Sequence[Tensor],
    *,
    retain_graph: bool,
    parallel_chunk_size: int | None = None,
) -> Tensor:
    """torchjd's ``mtl_backward``: task-specific parameters get their own task's gradient in ``.grad``;
    returns the ``[m, n]`` float32 Jacobian w.r.t. `params` (which it takes off their ``.jac``), summed
    over processes."""
    mtl_backward(
        list(losses),
        features=features,
        shared_params=params,
        retain_graph=retain_graph,
        parallel_chunk_size=parallel_chunk_size,
    )
    blocks = []
    for param in params:
        blocks.append(param.jac.reshape(len(losses), -1).float())
        del param.jac
    jacobian = torch.cat(blocks, dim=1)
    distributed.all_reduce_([jacobian])
    return jacobian


def task_gradients(losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool) -> list[list[Tensor]]:
    """Each loss's gradient w.r.t. `params`, one ordinary backward per task (no Jacobian is built).

    Every other leaf a loss reaches (its task's own head) accumulates that task's plain gradient in
    ``.grad``, as ``loss.backward()`` would; the ``.grad`` of `params` is left as it was. With several
    processes the gradients returned are summed over them (the heads' ``.grad`` stays local).
    """
    saved = [param.grad for param in params]
    grads = []
    try:
        for index, loss in enumerate(losses):
            for param in params:
                param.grad = None
            loss.backward(retain_graph=retain_graph or index < len(losses) - 1)
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
    finally:
        for param, grad in zip(params, saved, strict=True):
            param.grad = grad
    distributed.all_reduce_([grad for task in grads for grad in task])
    return grads


def gramian(grads: Sequence[Sequence[Tensor]]) -> Tensor:
    """The ``[m, m]`` float32 Gramian ``J J^T`` of per-task gradients, parameter by parameter."""
    result = torch.zeros(len(grads), len(grads), device=grads[0][0].device)
    for index in range(len(grads[0])):
        block = torch.stack([task[index].reshape(-1).float() for task in grads])
        result += block @ block.T
    return result


def accumulate_combination(params: Sequence[Tensor], grads: Sequence[Sequence[Tensor]], weights: Tensor) -> None:
    """Add ``sum_i weights[i] * grads[i]`` (the same on every process) to the ``.grad`` of `params`:
    with N processes, each adds its ``1 / N`` share (see the module docstring)."""
    share = 1.0 / distributed.world_size()
    scales = [weight * share for weight in weights.tolist()]  # one device sync, not one per parameter
    for index, param in enumerate(params):
        accumulate_grad(param, sum(w * task[index].float() for w, task in zip(scales, grads, strict=True)))


def accumulate_flat(params: Sequence[Tensor], vector: Tensor) -> None:
    """Add a flat gradient `vector` (the same on every process) to the ``.grad`` of `params` (in order):
    with N processes, each adds its ``1 / N`` share (see the module docstring)."""
    world = distributed.world_size()
    if world > 1:
        vector = vector / world
    offset = 0
    for param in params:
        accumulate_grad(param, vector[offset : offset + param.numel()])
        offset += param.numel()


def backward_through_features(
    losses: Sequence[Tensor], features: Tensor, direction: Tensor, extra_loss: Tensor | None
) -> None:
    """Backward of ``sum(losses) + extra_loss`` with the task part of the gradient at `features`
    replaced by `direction` (a flat gradient at the features).

    Whatever lies between the features and the losses (the heads) gets the plain sum's gradient;
    the backbone gets `direction` plus the extra loss's own gradient at the features.
    """
    if extra_loss is not None and extra_loss.requires_grad:
        (extra_grad,) = torch.autograd.grad(extra_loss, features, retain_graph=True, allow_unused=True)
        if extra_grad is not None:
            direction = direction + extra_grad.reshape(-1).float()
    replacement = direction.reshape(features.shape).to(features.dtype)
    handle = features.register_hook(lambda _grad: replacement)
    try:
        objective = sum(losses[1:], losses[0])
        if extra_loss is not None:
            objective = objective + extra_loss
        objective.backward()
    finally:
        handle.remove()
