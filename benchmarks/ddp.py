"""Multi-process training speed: optimiser steps per second with 1 and 2 processes (torchrun; gloo on
CPU, NCCL on GPUs) on the default easy-VQA recipe, in one run. Each process takes a batch of
`data.batch_size` questions per step, so N processes train on N batches per step: questions per second
is the figure to compare. Two stages of the recipe are timed: the frozen warm-up (fusion and heads on
cached encoder features; the cache is built once, each process encoding its share) and fine-tuning
(the image encoder trains).

    python -m benchmarks.ddp [--processes 1 2] [--steps 30] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USAGE = "python -m benchmarks.ddp [--processes 1 2] [--steps 30] [key=value ...]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header  # noqa: E402
from dualhead.core import distributed  # noqa: E402
from dualhead.core.config import load_config  # noqa: E402
from dualhead.core.trainer import Trainer  # noqa: E402

WARMUP_STEPS = 3  # untimed steps per stage: allocator and kernel caches warm up


def endless_batches(trainer: Trainer, epoch: int):
    """This process's training batches of the current stage, epoch after epoch."""
    while True:
        trainer.sampler.set_epoch(epoch)
        yield from trainer.experiment.train_loader()
        epoch += 1


def timed_steps(trainer: Trainer, epoch: int, steps: int) -> dict[str, float]:
    """Seconds for `steps` training steps at the start of `epoch`'s stage, and the questions they took
    (every process's), after a few untimed steps."""
    started = time.perf_counter()
    trainer.experiment.on_epoch_start(epoch)  # freezes, and builds the feature cache where it freezes
    distributed.barrier()
    stage_seconds = time.perf_counter() - started
    batches = endless_batches(trainer, epoch)
    for _ in range(WARMUP_STEPS):
        trainer.train_step(next(batches))
    questions = 0
    distributed.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        questions += trainer.experiment.batch_size_of(batch)
        trainer.train_step(batch)
    distributed.barrier()
    seconds = time.perf_counter() - started
    (questions,) = distributed.sum_over_processes([questions])
    return {"seconds": seconds, "steps": steps, "questions": questions, "stage_seconds": stage_seconds}


def worker(out: Path, steps: int, overrides: list[str]) -> None:
    """One process of an N-process measurement (started by torchrun); rank 0 writes the figures."""
    config = load_config("easy_vqa", ["train.progress=false", "train.diagnostics_every_steps=null", *overrides])
    with tempfile.TemporaryDirectory() as scratch:  # a Trainer writes only when it fits: nothing lands here
        trainer = Trainer(config, scratch)
        figures = {
            "processes": distributed.world_size(),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
            "frozen": timed_steps(trainer, 0, steps),
            "finetune": timed_steps(trainer, config.train.frozen_warmup_epochs, steps),
        }
    if distributed.is_main():
        out.write_text(json.dumps(figures))
    distributed.shutdown()


def measure(processes: int, steps: int, overrides: list[str]) -> dict:
    """Run the worker under torchrun with `processes` processes, the machine's cores split among them."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "benchmarks.ddp", "--worker", str(out), "--steps", str(steps), *overrides]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per stage")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: one torchrun process
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.overrides)
        return
    results = [measure(n, args.steps, args.overrides) for n in args.processes]
    base = results[0]
    print(header(f"python -m benchmarks.ddp {' '.join(sys.argv[1:])}"))
    print(f"easy-VQA default recipe, {args.steps} timed steps per stage after {WARMUP_STEPS} untimed; "
          "questions/s relative to the first row.\n")
    print("| stage | processes | threads each | questions per step | steps/s | questions/s | relative |"
          " stage set-up (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for stage in ("frozen", "finetune"):
        for row in results:
            figures = row[stage]
            rate = figures["questions"] / figures["seconds"]
            relative = rate / (base[stage]["questions"] / base[stage]["seconds"])
            print(f"| {stage} | {row['processes']} | {row['threads']} | {figures['questions'] / figures['steps']:.0f} "
                  f"| {figures['steps'] / figures['seconds']:.2f} | {rate:.0f} | {relative:.2f}x "
                  f"| {figures['stage_seconds']:.1f} |")


if __name__ == "__main__":
    main()
