"""Balancers: training-step time of each method as a ratio to fixed weights (one run, same model and
batches), in representation and parameter mode; with --accuracy, VQA-RAD accuracy per method over seeds.

    python -m benchmarks.balancers [--steps 6] [--methods pcgrad upgrad ...]
    python -m benchmarks.balancers --accuracy [--seeds 0 1 2] [--root ../shared/data/vqa_rad] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

USAGE = "python -m benchmarks.balancers [--accuracy] [--methods ...] [key=value ...]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header, mean_std  # noqa: E402
from dualhead.config import load_config  # noqa: E402
from dualhead.mtl.balancers import BALANCERS, build_balancer  # noqa: E402
from dualhead.train.features import model_inputs  # noqa: E402
from dualhead.train.studies import train_or_resume  # noqa: E402
from dualhead.train.trainer import Trainer  # noqa: E402

ACCURACY_METHODS = ["fixed", "uw", "dwa", "gradnorm", "pcgrad", "cagrad", "nash_mtl", "famo"]


def variants(name: str, tasks: list[str]) -> list[tuple[str, dict]]:
    """The modes a method takes: representation and parameters for Jacobian methods, else its own."""
    try:
        build_balancer(name, tasks, mode="representation")
    except ValueError:  # no `mode` option: loss weighting, or a single fixed mode (DB-MTL)
        return [("default", {})]
    return [("representation", {"mode": "representation"}), ("parameters", {"mode": "parameters"})]


def step_times(methods: list[str], steps: int, overrides: list[str]) -> dict[tuple[str, str], float]:
    """Median seconds of one training step (forward, balancer backward, optimiser) per method and mode."""
    config = load_config("easy_vqa", ["train.progress=false", "model.text.freeze=false", *overrides])
    trainer = Trainer(config, "runs/bench/balancer-speed")
    trainer._enter_stage(config.train.frozen_warmup_epochs)  # the fine-tuning stage: every encoder trains
    batches = [batch.to(trainer.device) for _, batch in zip(range(steps + 1), trainer.train_loader, strict=False)]
    shared = trainer._shared_params()
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    times = {}
    for name in methods:
        for mode, options in variants(name, trainer.objective.tasks):
            trainer.model.load_state_dict(initial)
            balancer = build_balancer(name, trainer.objective.tasks, **options).to(trainer.device)
            optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-5, fused=True)
            durations = []
            for index, batch in enumerate(batches):
                started = time.perf_counter()
                with trainer._autocast():
                    output = trainer.model(**model_inputs(batch, trainer.cache))
                    losses, router = trainer.objective(output, batch)
                balancer.backward(losses, shared_params=shared, shared_features=output.fused, extra_loss=0.1 * router, step=index)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if index:  # the first step warms caches up
                    durations.append(time.perf_counter() - started)
            times[name, mode] = sorted(durations)[len(durations) // 2]
            print(f"{name:<12} {mode:<15} {times[name, mode]:.3f} s", flush=True)
    return times


def accuracy_table(methods: list[str], seeds: list[int], root: str, out: str, overrides: list[str]) -> None:
    """Train on VQA-RAD with each method and seed (finished runs are read back, interrupted ones
    resume); print test accuracy, mean ± std over seeds."""
    rows = []
    for name in methods:
        results = []
        for seed in seeds:
            config = load_config("vqa_rad", [f"data.root={root}", f"train.seed={seed}", f"train.balancer={name}", "train.progress=false", *overrides])
            results.append(train_or_resume(config, Path(out) / f"{name}-seed{seed}"))
            print(json.dumps({"method": name, "seed": seed, "accuracy": results[-1]["test"]["accuracy"]}), flush=True)
        rows.append((name, results))
    print(header(f"python -m benchmarks.balancers {' '.join(sys.argv[1:])}"))
    print("| method | overall | yes/no | open-ended | minutes per run |\n| --- | ---: | ---: | ---: | ---: |")
    for name, results in rows:
        tests = [r["test"] for r in results]
        minutes = sum(r["wall_seconds"] for r in results) / len(results) / 60
        print(f"| {name} | {mean_std([t['accuracy'] for t in tests])} | {mean_std([t['binary_accuracy'] for t in tests])} "
              f"| {mean_std([t['open_accuracy'] for t in tests])} | {minutes:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", action="store_true", help="train on VQA-RAD with each method instead of timing steps")
    parser.add_argument("--methods", nargs="+", help="methods to run (default: all for speed, 8 for accuracy)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="../shared/data/vqa_rad")
    parser.add_argument("--out", default="runs/bench/balancers", help="where --accuracy keeps its runs")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.accuracy:
        accuracy_table(args.methods or ACCURACY_METHODS, args.seeds, args.root, args.out, args.overrides)
        return
    methods = args.methods or sorted(BALANCERS)
    if "fixed" not in methods:
        methods = ["fixed", *methods]
    times = step_times(methods, args.steps, args.overrides)
    base = times["fixed", "default"]
    print(header(f"python -m benchmarks.balancers {' '.join(sys.argv[1:])}"))
    print(f"Fixed weights: {base:.3f} s per step (median of {args.steps}).\n")
    print("| method | mode | step time / fixed |\n| --- | --- | ---: |")
    for (name, mode), seconds in times.items():
        print(f"| {name} | {mode} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
