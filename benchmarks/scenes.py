"""Procedural scenes: the hard-sharing FPN trained on segmentation, depth and normals at once, against
one single-task model per task; test metrics mean ± std over seeds, Δm, parameters and speed.

    python -m benchmarks.scenes [--seeds 0 1 2] [--out runs/bench/scenes] [--quick] [key=value ...]

Every model trains from the bundled ``scenes`` config on the same scenes (``data.seed`` is fixed;
the seeds are training seeds). Finished runs are read back from ``--out``, so an interrupted
benchmark picks up where it stopped. ``--quick`` trains tiny models on tiny data (a smoke test).
`benchmarks.architectures` compares every registered architecture the same way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

USAGE = "python -m benchmarks.scenes [--seeds 0 1 2] [--out DIR] [--quick] [key=value ...]"

if not __package__:
    sys.exit(f"run it from the repository root as: {USAGE}")

from benchmarks.common import header  # noqa: E402
from dualhead.core.config import load_config  # noqa: E402
from dualhead.core.trainer import Trainer  # noqa: E402
from dualhead.dense.metrics import delta_m  # noqa: E402
from dualhead.dense.tasks import DENSE_TASKS  # noqa: E402

TASKS = ("seg", "depth", "normals")
MULTI = "multi-task"  # hard_fpn on every task
SUMMARY_FILE = "benchmark_summary.json"
QUICK = [
    "data.image_size=32",
    "data.train_size=64",
    "data.val_size=16",
    "data.test_size=16",
    "train.epochs=1",
]


def run(variant: str, seed: int, out: Path, overrides: list[str]) -> dict:
    """Train one model (or read back a finished run): test metrics, parameters, training images/s,
    inference ms/image. `variant`: a task (its single-task hard_fpn baseline), `MULTI` (hard_fpn on
    every task), or an architecture name (that architecture on every task)."""
    run_dir = out / f"{variant}-seed{seed}"
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        result = json.loads(summary.read_text())
        if result["overrides"] != overrides:
            sys.exit(
                f"{run_dir} was trained with overrides {result['overrides']}, not {overrides}: "
                "choose another --out"
            )
        return result
    tasks = [variant] if variant in TASKS else list(TASKS)
    architecture = [] if variant in (*TASKS, MULTI) else [f"model.architecture={variant}"]
    config = load_config(
        "scenes",
        [
            f"data.tasks=[{','.join(tasks)}]",
            *architecture,
            f"train.seed={seed}",
            "train.progress=false",
            *overrides,
        ],
    )
    trainer = Trainer(config, run_dir)
    results = trainer.fit()
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["train/samples_per_second"] for row in epochs if row.get("kind") == "epoch"]
    result = {
        "overrides": overrides,
        "test": results["test"],
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "images_per_second": statistics.mean(speeds),
        "inference_ms_per_image": inference_ms_per_image(trainer),
    }
    summary.write_text(json.dumps(result, indent=2))
    return result


def inference_ms_per_image(trainer: Trainer, repeats: int = 10) -> float:
    """Median milliseconds per image of the trained model's forward pass on one test batch (eval mode,
    the run's precision, after two warm-up passes)."""
    experiment = trainer.experiment
    batch = experiment.to_device(next(iter(experiment.eval_loader("test"))))
    experiment.model.eval()
    durations = []
    with torch.no_grad():
        for index in range(repeats + 2):
            started = time.perf_counter()
            with experiment.autocast():
                experiment.forward(batch)
            if experiment.device.type == "cuda":
                torch.cuda.synchronize()
            if index >= 2:
                durations.append(time.perf_counter() - started)
    return 1000 * statistics.median(durations) / experiment.batch_size_of(batch)


def mean_std(values: list[float], scale: float = 1.0) -> str:
    """'mean ± std' over seeds (sample standard deviation); 'nan' where a value is undefined."""
    values = scale * np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def table(results: dict[str, list[dict]], multi: dict[str, str], reference: str | None = None) -> str:
    """Markdown: the single-task baselines, then each multi-task variant of `multi` (variant -> row
    label); a column per test metric (percentages for fractions), Δm against the single-task models
    of the same seed, parameters, training images/s, inference ms/image. With `reference` (a variant),
    also each variant's Δm minus the reference's, paired per seed: the single-task baselines' own
    seed-to-seed noise, which moves every Δm of a seed alike, cancels there."""
    directions = {
        f"{task}/{metric}": higher for task in TASKS for metric, higher in DENSE_TASKS[task].metrics.items()
    }
    percent = {"seg/miou", "seg/pixel_acc", "depth/rel_err"} | {m for m in directions if "within" in m}
    columns = [f"{m}{' %' if m in percent else ''} {'↑' if up else '↓'}" for m, up in directions.items()]
    paired = [f"Δm − {multi[reference]} %"] if reference else []
    lines = [
        "| model | " + " | ".join(columns + ["Δm %", *paired]) + " | parameters | train images/s | inference ms/image |",
        "| --- |" + " ---: |" * (len(columns) + 4 + len(paired)),
    ]

    def deltas(variant: str) -> list[float]:
        values = []
        for index, r in enumerate(results[variant]):
            single = {m: results[m.split("/")[0]][index]["test"][m] for m in directions}
            try:
                values.append(delta_m(r["test"], single, directions))
            except ValueError:  # a baseline scored 0 on some metric (tiny --quick runs)
                values.append(float("nan"))
        return values

    rows = [(task, f"single-task {task}") for task in TASKS] + list(multi.items())
    for variant, label in rows:
        runs = results[variant]
        cells = []
        for metric in directions:
            values = [r["test"][metric] for r in runs if metric in r["test"]]
            cells.append(mean_std(values, 100 if metric in percent else 1) if values else "")
        if variant in TASKS:
            cells += ["0 (baseline)"] + [""] * len(paired)
        else:
            cells.append(mean_std(deltas(variant)))
            if reference:
                differences = [a - b for a, b in zip(deltas(variant), deltas(reference), strict=True)]
                cells.append("0 (reference)" if variant == reference else mean_std(differences))
        speed = statistics.mean(r["images_per_second"] for r in runs)
        latencies = [r["inference_ms_per_image"] for r in runs if "inference_ms_per_image" in r]
        latency = f"{statistics.mean(latencies):.2f}" if latencies else ""
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {runs[0]['parameters'] / 1e6:.2f} M | {speed:.0f} | {latency} |"
        )
    singles = sum(results[task][0]["parameters"] for task in TASKS)
    lines.append(f"\nThe three single-task models hold {singles / 1e6:.2f} M parameters in all.")
    return "\n".join(lines)


def arguments(description: str, usage: str, default_out: str) -> argparse.ArgumentParser:
    """The options the scenes benchmarks share."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, usage=usage
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=default_out)
    parser.add_argument(
        "--quick", action="store_true", help="tiny data and one epoch: checks that the benchmark runs"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return parser


def train_all(variants: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every variant for every seed (finished runs read back): {variant: [result per seed]}."""
    overrides = (QUICK if args.quick else []) + list(args.overrides)
    out = Path(args.out) / ("quick" if args.quick else "full")
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    for seed in args.seeds:
        for variant in variants:
            results[variant].append(run(variant, seed, out, overrides))
            print(f"done: {variant}, seed {seed}", flush=True)
    return results


def main() -> None:
    args = arguments(__doc__, USAGE, "runs/bench/scenes").parse_args()
    results = train_all([*TASKS, MULTI], args)
    print("\n" + header(f"python -m benchmarks.scenes {' '.join(sys.argv[1:])}".strip()))
    print(table(results, {MULTI: "multi-task"}))


if __name__ == "__main__":
    main()
