"""DB-MTL (Lin, Ye, Xu, Shi & Zhang, "Dual-Balancing for Multi-Task Learning", 2023,
arXiv:2308.12029); torchjd has none, so it is ours (following the authors' LibMTL code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dualhead.mtl.balancers.base import BALANCERS, Balancer, BalanceReport, full_precision, plain_backward
from dualhead.mtl.balancers.jacobian import accumulate_flat, check_features, shared_jacobian


@BALANCERS.register("db_mtl")
class DBMTL(Balancer):
    """Dual balancing: log-transformed losses (loss scale) and equalised gradient magnitudes.

    Each present task's gradient ``g_t = d log(L_t + eps)/d theta`` on the shared parameters feeds a
    per-task moving average ``m_t <- g_t + beta_k * (m_t - g_t)``, ``beta_k = beta / k ** beta_sigma``
    at the task's k-th step; the shared update is ``sum_t (max_j ||m_j|| / ||m_t||) * m_t`` over the
    present tasks (reported weights: those scales). Task-specific parameters get ``g_t`` (their own
    log-loss gradient). One present task: a plain backward of its log-loss (weight 1).

    The moving averages live in parameter space (a ``[tasks, shared parameters]`` buffer, sized at
    the first step), so there is no representation mode: per-sample representation gradients of
    different batches do not average. Several processes: the Jacobian is summed over them before the
    moving averages see it (`shared_jacobian`), so every process keeps the same averages.
    """

    mode = "parameters"  # where it acts, as the other gradient methods say (it has no other mode)

    def __init__(
        self,
        tasks: Sequence[str],
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
        parallel_chunk_size: int | None = 1,
    ):
        super().__init__(tasks)
        if not 0 <= beta < 1:
            raise ValueError(f"DB-MTL's beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.eps = eps
        self.parallel_chunk_size = parallel_chunk_size
        self.register_buffer("grad_average", torch.zeros(0))
        self.register_buffer("task_steps", torch.zeros(len(self.tasks), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "grad_average")
        if saved is not None and saved.shape != self.grad_average.shape:
            self.grad_average = torch.zeros_like(saved, device=self.grad_average.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def backward(self, losses, *, shared_params, shared_features=None, extra_loss=None, epoch=0, step=0):
        present = self.present(losses)
        log_losses = [torch.log(losses[task].float() + self.eps) for task in present]
        if len(present) < 2:
            total = plain_backward(log_losses[0] if log_losses else None, extra_loss)
            return BalanceReport(loss=total, weights=dict.fromkeys(present, 1.0))
        features = check_features(shared_features, "db_mtl")
        params = [p for p in shared_params if p.requires_grad]
        with full_precision(features):
            jacobian = shared_jacobian(
                log_losses,
                features,
                params,
                retain_graph=extra_loss is not None,
                parallel_chunk_size=self.parallel_chunk_size,
            )
            if self.grad_average.shape[-1:] != jacobian.shape[1:]:
                # first step, or the trainable shared parameters changed (a frozen warm-up ended):
                # averages over other parameters mean nothing for these, so they start again
                self.grad_average = jacobian.new_zeros(len(self.tasks), jacobian.shape[1])
                self.task_steps.zero_()
            index = self.task_index(present)
            self.task_steps[index] += 1
            betas = self.beta / self.task_steps[index].to(jacobian).pow(self.beta_sigma)
            average = torch.lerp(jacobian, self.grad_average[index], betas.unsqueeze(1))  # g + b (m - g)
            self.grad_average[index] = average
            norms = average.norm(dim=1)
            scales = norms.max() / (norms + self.eps)
            accumulate_flat(params, scales @ average)
        plain_backward(None, extra_loss)
        total = sum(float(loss.detach()) for loss in log_losses)
        if extra_loss is not None:
            total += float(extra_loss.detach())
        return BalanceReport(loss=total, weights=dict(zip(present, scales.tolist(), strict=True)))
