"""Balancers: training-step time of each method as a ratio to fixed weights (one run, same model and
batches), gradient methods at the shared parameters; with --accuracy, VQA-RAD accuracy per method over seeds.

    python -m benchmarks.balancers [--steps 6] [--methods pcgrad upgrad ...]
    python -m benchmarks.balancers --accuracy [--seeds 0 1 2] [--root ../shared/data/vqa_rad] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

USAGE = "python -m benchmarks.balancers [--accuracy] [--methods ...] [key=value ...]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header, mean_std  # noqa: E402
from dualhead.core.config import load_config, with_overrides  # noqa: E402
from dualhead.core.trainer import Trainer, build_experiment  # noqa: E402
from dualhead.mtl.balancers import BALANCERS  # noqa: E402
from dualhead.vqa.studies import train_or_resume  # noqa: E402

ACCURACY_METHODS = ["fixed", "uw", "dwa", "gradnorm", "pcgrad", "cagrad", "nash_mtl", "famo"]


def step_times(methods: list[str], steps: int, overrides: list[str]) -> dict[str, float]:
    """Median seconds of one `Trainer.train_step` (forward, balancer backward, optimiser step) per
    method, in the fine-tuning stage (every encoder trains), on the same batches from the same weights.
    Gradient methods act at the shared parameters: VQA's partial labels leave nothing to act on at the
    fused features (the Trainer refuses that mode)."""
    config = load_config("easy_vqa", ["train.progress=false", "model.text.freeze=false",
                                      "train.diagnostics_every_steps=null", *overrides])
    experiment = build_experiment(config)
    initial = {k: v.clone() for k, v in experiment.model.state_dict().items()}
    experiment.on_epoch_start(config.train.frozen_warmup_epochs)
    batches = [batch for _, batch in zip(range(steps + 1), experiment.train_loader(), strict=False)]
    times = {}
    for name in methods:
        experiment.model.load_state_dict(initial)
        trainer = Trainer(with_overrides(config, [f"train.balancer={name}"]), "runs/bench/balancer-speed", experiment)
        durations = []
        for index, batch in enumerate(batches):
            started = time.perf_counter()
            trainer.train_step(batch)
            if index:  # the first step warms caches up
                durations.append(time.perf_counter() - started)
        times[name] = sorted(durations)[len(durations) // 2]
        print(f"{name:<12} {times[name]:.3f} s", flush=True)
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
    base = times["fixed"]
    print(header(f"python -m benchmarks.balancers {' '.join(sys.argv[1:])}"))
    print(f"Fixed weights: {base:.3f} s per step (median of {args.steps}).\n")
    print("| method | step time / fixed |\n| --- | ---: |")
    for name, seconds in times.items():
        print(f"| {name} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
