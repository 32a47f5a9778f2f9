"""A resumable shuffled batch sampler: each epoch's order follows from (seed, epoch) alone."""

from __future__ import annotations

import numpy as np

from dualhead.core.distributed import ShardableBatchSampler


class ShuffledBatchSampler(ShardableBatchSampler):
    """Batches of `batch_size` indices of a permutation of ``range(size)`` drawn from (seed, epoch).

    Every index appears once per epoch. A last batch of a single sample joins the one before it (one
    sample alone breaks batch norm in training). `set_epoch(epoch, skip)` leaves out the first `skip`
    batches, so a run resumed mid-epoch sees exactly the batches it had not seen; with several
    processes (`shard`), each takes every N-th batch, so a step's global batch is N batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0):
        if size < 1 or batch_size < 1:
            raise ValueError(f"need at least one sample and a batch size >= 1, got size={size}, batch_size={batch_size}")
        self.size = size
        self.batch_size = batch_size
        super().__init__(seed)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) == 1:
            last = batches.pop()
            batches[-1] += last
        return batches
