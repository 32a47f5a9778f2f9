"""Multi-process data parallelism on torch.distributed: the process group, who writes, the collectives
training needs, and the sharding of batches.

``torchrun --nproc-per-node N -m dualhead train ...`` (with ``--nnodes`` for several machines) starts N
processes with RANK, LOCAL_RANK and WORLD_SIZE in their environment; `setup` joins them into one process
group (NCCL on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on CPU). Without torchrun, or with one
process, every helper here is a no-op and training is the single-process code path.

A step with N processes computes the gradient one process computes over the union of their batches:

- batches: each optimiser step's global batch is the union of one batch per process (`split_rounds`);
- losses: a task's loss is a mean over its labelled samples and processes hold different counts of
  them (partial labels), so `global_mean_shares` hands every process the global mean's value with its
  own share of the gradient, and the sum all-reduce of gradients (`all_reduce_gradients`) is exact;
- gradient methods all-reduce their per-task gradients before aggregating them
  (`dualhead.mtl.balancers.jacobian`), so every process aggregates what one process would see.

Gradients are all-reduced explicitly after the balancer's backward, not by torch's
DistributedDataParallel wrapper: balancers write ``.grad`` themselves (torchjd, one backward per task,
`accumulate_*`), outside the autograd hooks DDP relies on, and one all-reduce per optimiser step also
covers gradient accumulation. The price is no overlap of communication with the backward pass.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from dualhead.core.runtime import resolve_device

BUCKET_BYTES = 32 * 2**20  # tensors are flattened into buckets of about this size, one collective each
# How long a process waits in a collective: rank 0 evaluates a whole split alone while the others wait
# (torch's defaults, 10 minutes for NCCL, can be too short for a large test split).
TIMEOUT = timedelta(hours=1)


# -- the process group --------------------------------------------------------------------------------


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE must be an integer, got {value!r}") from None


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device_name: str = "auto") -> torch.device:
    """The device of this process, joining the process group first when torchrun started several.

    Under torchrun each process takes ``cuda:LOCAL_RANK`` (``train.device`` ``auto`` or ``cuda``) or the
    CPU; a device pinned to one GPU (``cuda:1``) is refused, since every process would share it. Logs of
    processes other than rank 0 are limited to warnings. Calling it again returns the same device. The
    process leaves the group at exit if `shutdown` was not called before.
    """
    device = resolve_device(device_name)
    if launched_world_size() <= 1 and not dist.is_initialized():
        return device
    if device.type == "cuda":
        if device.index is not None and device_name not in ("auto", "cuda"):
            raise ValueError(
                f"train.device={device_name} pins every process to one GPU; under torchrun each process "
                "takes cuda:LOCAL_RANK: use train.device=cuda (or auto)"
            )
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(
                f"process LOCAL_RANK={local_rank()} has no GPU: this machine has "
                f"{torch.cuda.device_count()}; start at most that many processes per machine "
                "(torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(device), device_id=device if device.type == "cuda" else None, timeout=TIMEOUT
        )
        # A process that ends without leaving the group (a Python script looping over Trainer.fit) would
        # be aborted at interpreter exit by gloo's worker threads ("terminate called without an active
        # exception"); leaving it while the interpreter is still whole avoids that.
        atexit.register(shutdown)
    if not is_main():
        logging.getLogger("dualhead").setLevel(logging.WARNING)
    return device


def shutdown() -> None:
    """Leave the process group, at the end of a command (a process does not join again)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process trains together with others."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes checkpoints, logs, plots and results."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where small tensors for collectives live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- collectives ---------------------------------------------------------------------------------------


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` (any picklable object), on every process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every process's `value`, in rank order."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_processes(values: Sequence[float]) -> list[float]:
    """Each of `values` summed over every process."""
    if not is_distributed():
        return list(values)
    packed = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(packed)
    return packed.tolist()


def _buckets(tensors: Sequence[Tensor], limit: int) -> Iterator[list[Tensor]]:
    """Consecutive runs of `tensors` of one dtype and device, each about `limit` bytes at most."""
    bucket: list[Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and (
            size + tensor.numel() * tensor.element_size() > limit
            or (tensor.dtype, tensor.device) != (bucket[0].dtype, bucket[0].device)
        ):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel() * tensor.element_size()
    if bucket:
        yield bucket


def _flat_collective(tensors: Sequence[Tensor], operation, bucket_bytes: int) -> None:
    for bucket in _buckets(tensors, bucket_bytes):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            operation(bucket[0])
            continue
        flat = torch.cat([tensor.reshape(-1) for tensor in bucket])
        operation(flat)
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
            offset += tensor.numel()


def all_reduce_(tensors: Sequence[Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum `tensors` over every process, in place (a few flat buckets: one collective per bucket)."""
    if is_distributed():
        _flat_collective(tensors, dist.all_reduce, bucket_bytes)


def broadcast_(tensors: Sequence[Tensor], src: int = 0, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Overwrite `tensors` with rank `src`'s, in place."""
    if is_distributed():
        _flat_collective(tensors, lambda flat: dist.broadcast(flat, src=src), bucket_bytes)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process rank `src`'s parameters and buffers (the same model everywhere)."""
    with torch.no_grad():
        broadcast_([*module.parameters(), *module.buffers()], src=src)


def all_reduce_gradients(params: Sequence[Tensor]) -> None:
    """Sum the ``.grad`` of `params` over every process. A parameter with a gradient on some process gets
    one on all (zeros where it had none); one with a gradient nowhere keeps None, so the optimiser skips
    it as a single process would."""
    if not is_distributed() or not params:
        return
    present = torch.tensor(
        [p.grad is not None for p in params], dtype=torch.int32, device=_collective_device()
    )
    dist.all_reduce(present)
    grads = []
    for param, count in zip(params, present.tolist(), strict=True):
        if count:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
    all_reduce_(grads)


def all_gather_rows(tensor: Tensor) -> list[Tensor]:
    """Every process's `tensor` (same trailing shape, any number of rows), in rank order."""
    if not is_distributed():
        return [tensor]
    counts = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    gathered_counts = [torch.zeros_like(counts) for _ in range(world_size())]
    dist.all_gather(gathered_counts, counts)
    sizes = [int(count) for count in gathered_counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return [part[:size] for part, size in zip(parts, sizes, strict=True)]


@contextmanager
def same_random_draws(seed: int, device: torch.device) -> Iterator[None]:
    """Inside, torch's random generator is seeded with `seed` on every process (and restored after), so
    random draws (a randomised balancer's) are the same everywhere. A single process is left alone."""
    if not is_distributed():
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


# -- losses over the global batch -----------------------------------------------------------------------


def global_mean_shares(
    means: Mapping[str, Tensor | None], counts: Mapping[str, float], anchors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Per name, the mean over every process's samples, as a tensor whose value is that global mean and
    whose gradient is this process's share of its gradient, ``(n_local / n_global) * d(local mean)``.

    means: this process's mean per name (None, or absent, where it has no sample of it).
    counts: the number (or total weight) of samples each mean is over; its keys, in the same order on
    every process, are the names.
    anchors: per name, a tensor of the graph; a name this process has no sample of (but another has)
    gets the global value plus zero times its anchor, so every process hands the balancer the same
    names, with a gradient of zeros along the same graph.

    Summing the processes' gradients then gives one process's gradient over the union of the batches.
    Names with no sample on any process are left out.
    """
    names = list(counts)
    present = [means.get(name) is not None and counts[name] > 0 for name in names]
    packed = torch.tensor(
        [
            float(counts[name]) * float(means[name].detach()) if here else 0.0
            for name, here in zip(names, present, strict=True)
        ]
        + [float(counts[name]) if here else 0.0 for name, here in zip(names, present, strict=True)],
        dtype=torch.float64,
        device=_collective_device(),
    )
    dist.all_reduce(packed)
    totals, global_counts = packed[: len(names)].tolist(), packed[len(names) :].tolist()
    shares: dict[str, Tensor] = {}
    for name, here, total, global_count in zip(names, present, totals, global_counts, strict=True):
        if global_count <= 0:
            continue
        value = total / global_count
        if here:
            mean, share = means[name], float(counts[name]) / global_count
            shares[name] = mean * share + (value - share * float(mean.detach()))
        else:
            anchor = anchors.get(name)
            if anchor is None:
                raise ValueError(
                    f"no tensor to anchor the gradient of {name!r} on a process without its samples"
                )
            shares[name] = anchor.float().sum() * 0.0 + value
    return shares


# -- batches -------------------------------------------------------------------------------------------


def split_rounds(batches: Sequence[list[int]], world: int) -> list[list[list[int]]]:
    """Deal an epoch's `batches` to `world` processes: one round (one optimiser step) per `world`
    consecutive batches, process r taking the r-th. The leftover batches of an incomplete last round
    are pooled and cut into `world` near-equal contiguous shares; with fewer than ``2 * world`` samples
    left, they join the round before instead (one each to the first processes). Every sample appears
    once per epoch, and the union of a round's shares is its global batch."""
    if world < 1:
        raise ValueError(f"the number of processes must be >= 1, got {world}")
    full = len(batches) // world
    rounds = [[list(batch) for batch in batches[i * world : (i + 1) * world]] for i in range(full)]
    rest = [index for batch in batches[full * world :] for index in batch]
    if not rest:
        return rounds
    if len(rest) >= 2 * world or not rounds:
        if len(rest) < world:
            raise ValueError(
                f"an epoch holds {len(rest)} samples, fewer than the {world} processes training on it"
            )
        base, extra = divmod(len(rest), world)
        sizes = [base + (r < extra) for r in range(world)]
        starts = [sum(sizes[:r]) for r in range(world)]
        rounds.append([rest[start : start + size] for start, size in zip(starts, sizes, strict=True)])
    else:
        rounds[-1] = [share + rest[r::world] for r, share in enumerate(rounds[-1])]
    return rounds


class ShardableBatchSampler(Sampler[list[int]]):
    """Base of the training batch samplers: an epoch's batches follow from (seed, epoch) alone.

    `set_epoch(epoch, skip)` leaves out the first `skip` steps (a run resumed mid-epoch sees exactly the
    batches it had not seen); `shard(rank, world_size)` makes each step yield this process's share of
    the step's global batch (`split_rounds`), the same order on every process. Subclasses set their
    fields, call ``super().__init__(seed)`` and implement `epoch_batches`.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.rank, self.world_size = 0, 1
        self.set_epoch(0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch` (one process's view: the global order)."""
        raise NotImplementedError

    def shard(self, rank: int, world_size: int) -> None:
        """From now on yield process `rank`'s share of each step (of `world_size` processes)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.set_epoch(self.epoch, self.skip)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Shuffle for `epoch`; the first `skip` steps are left out (resuming mid-epoch)."""
        self.epoch, self.skip = epoch, skip
        self._rounds = split_rounds(self.epoch_batches(epoch), self.world_size)

    def global_batches(self) -> list[list[int]]:
        """The current epoch's global batch per step (the union of every process's share)."""
        return [[index for share in round_ for index in share] for round_ in self._rounds]

    def __iter__(self) -> Iterator[list[int]]:
        for round_ in self._rounds[self.skip :]:
            yield round_[self.rank]

    @property
    def epoch_length(self) -> int:
        """Steps in the current epoch, skipped ones included."""
        return len(self._rounds)

    def __len__(self) -> int:
        return len(self._rounds) - self.skip
