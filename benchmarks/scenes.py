"""Procedural scenes: the hard-sharing FPN trained on segmentation, depth and normals at once, against
one single-task model per task; test metrics mean ± std over seeds, Δm, parameters and speed.

    python -m benchmarks.scenes [--seeds 0 1 2] [--out runs/bench/scenes] [--quick] [key=value ...]

Every model trains from the bundled ``scenes`` config on the same scenes (``data.seed`` is fixed;
the seeds are training seeds). Finished runs are read back from ``--out``, so an interrupted
benchmark picks up where it stopped. ``--quick`` trains tiny models on tiny data (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

USAGE = "python -m benchmarks.scenes [--seeds 0 1 2] [--out DIR] [--quick] [key=value ...]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header  # noqa: E402
from dualhead.core.config import load_config  # noqa: E402
from dualhead.core.trainer import Trainer  # noqa: E402
from dualhead.dense.metrics import delta_m  # noqa: E402
from dualhead.dense.tasks import DENSE_TASKS  # noqa: E402

TASKS = ("seg", "depth", "normals")
MULTI = "multi-task"
SUMMARY_FILE = "benchmark_summary.json"
QUICK = ["data.image_size=32", "data.train_size=64", "data.val_size=16", "data.test_size=16", "train.epochs=1"]


def run(variant: str, seed: int, out: Path, overrides: list[str]) -> dict:
    """Train one model (or read back a finished run): test metrics, parameters, training images/s."""
    run_dir = out / f"{variant}-seed{seed}"
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        result = json.loads(summary.read_text())
        if result["overrides"] != overrides:
            sys.exit(f"{run_dir} was trained with overrides {result['overrides']}, not {overrides}: choose another --out")
        return result
    tasks = list(TASKS) if variant == MULTI else [variant]
    config = load_config("scenes", [f"data.tasks=[{','.join(tasks)}]", f"train.seed={seed}", "train.progress=false", *overrides])
    trainer = Trainer(config, run_dir)
    results = trainer.fit()
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["train/samples_per_second"] for row in epochs if row.get("kind") == "epoch"]
    result = {
        "overrides": overrides,
        "test": results["test"],
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "images_per_second": statistics.mean(speeds),
    }
    summary.write_text(json.dumps(result, indent=2))
    return result


def mean_std(values: list[float], scale: float = 1.0) -> str:
    """'mean ± std' over seeds (sample standard deviation); 'nan' where a value is undefined."""
    values = scale * np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    """Markdown: a row per model, a column per test metric (percentages for fractions), Δm of the
    multi-task model against the single-task models of the same seed."""
    directions = {f"{task}/{metric}": higher for task in TASKS for metric, higher in DENSE_TASKS[task].metrics.items()}
    percent = {"seg/miou", "seg/pixel_acc", "depth/rel_err"} | {m for m in directions if "within" in m}
    columns = [f"{m}{' %' if m in percent else ''} {'↑' if up else '↓'}" for m, up in directions.items()]
    lines = ["| model | " + " | ".join(columns) + " | Δm % | parameters | train images/s |",
             "| --- |" + " ---: |" * (len(columns) + 3)]
    deltas = []
    for index in range(len(seeds)):
        single = {m: results[m.split("/")[0]][index]["test"][m] for m in directions}
        try:
            deltas.append(delta_m(results[MULTI][index]["test"], single, directions))
        except ValueError:  # a baseline scored 0 on some metric (tiny --quick runs)
            deltas.append(float("nan"))
    for variant, runs in results.items():
        cells = []
        for metric in directions:
            values = [r["test"][metric] for r in runs if metric in r["test"]]
            cells.append(mean_std(values, 100 if metric in percent else 1) if values else "")
        delta = mean_std(deltas) if variant == MULTI else "0 (baseline)"
        speed = statistics.mean(r["images_per_second"] for r in runs)
        name = variant if variant == MULTI else f"single-task {variant}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {delta} | {runs[0]['parameters'] / 1e6:.2f} M | {speed:.0f} |")
    singles = sum(results[task][0]["parameters"] for task in TASKS)
    lines.append(f"\nThe three single-task models hold {singles / 1e6:.2f} M parameters in all.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, usage=USAGE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench/scenes")
    parser.add_argument("--quick", action="store_true", help="tiny data and one epoch: checks that the benchmark runs")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    overrides = (QUICK if args.quick else []) + list(args.overrides)
    out = Path(args.out) / ("quick" if args.quick else "full")
    results = {variant: [] for variant in (*TASKS, MULTI)}
    for seed in args.seeds:
        for variant in results:
            results[variant].append(run(variant, seed, out, overrides))
            print(f"done: {variant}, seed {seed}", flush=True)
    command = "python -m benchmarks.scenes " + " ".join(sys.argv[1:])
    print("\n" + header(command.strip()))
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
