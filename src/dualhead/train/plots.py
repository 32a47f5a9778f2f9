"""PNG plots of a run: loss and accuracy curves from `metrics.jsonl`, the binary head's confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dualhead.mtl.diagnostics import plot_diagnostics  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], prefix: str, title: str, path: Path, kind: str = "epoch") -> bool:
    """One line per metric whose name starts with `prefix`, against the optimiser step."""
    rows = [r for r in rows if r.get("kind") == kind]
    keys = sorted({k for r in rows for k, v in r.items() if k.startswith(prefix) and isinstance(v, int | float)})
    if not keys:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        ax.plot(*zip(*points, strict=True), marker="o" if kind == "epoch" else None, label=key.removeprefix(prefix))
    ax.set_xlabel("optimiser step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_confusion(matrix: list[list[int]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(matrix, cmap="Blues")
    for i in range(2):
        for j in range(2):
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center")
    ax.set_xticks([0, 1], ["no", "yes"])
    ax.set_yticks([0, 1], ["no", "yes"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run(run_dir: Path) -> list[Path]:
    """Draw every plot the run's files allow; returns the PNGs written."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    written = []
    for prefix, title, name, kind in (
        ("train/loss/", "training loss per task (epoch mean)", "loss.png", "epoch"),
        ("loss/", "training loss per task", "loss_steps.png", "step"),
        ("val/", "validation accuracy", "accuracy.png", "epoch"),
    ):
        rows_for_plot = rows if prefix != "val/" else [{k: v for k, v in r.items() if not k.startswith("val/") or k.endswith("accuracy")} for r in rows]
        if plot_curves(rows_for_plot, prefix, title, run_dir / name, kind):
            written.append(run_dir / name)
    if any(row.get("kind") == "diagnostics" for row in rows):
        written.append(plot_diagnostics(run_dir / "metrics.jsonl", run_dir / "gradient_conflict.png"))
    results = run_dir / "test_metrics.json"
    if results.is_file():
        data = json.loads(results.read_text())
        for split in ("test", "val"):
            if split in data and "binary_confusion" in data[split]:
                path = run_dir / f"confusion_binary_{split}.png"
                plot_confusion(data[split]["binary_confusion"], path, f"binary head, {split} split")
                written.append(path)
    return written


def plot_study(report: dict, path: Path) -> Path:
    """Bar chart of a study: overall, yes/no and open-ended accuracy per configuration (mean, with
    the std over seeds as error bars), and the reference design's expected figures as markers."""
    rows = report["rows"]
    metrics = (("overall", "overall"), ("binary", "yes/no"), ("open", "open-ended"))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.2))
    for offset, (key, label) in enumerate(metrics):
        xs = [i + (offset - 1) * width for i in range(len(rows))]
        means = [100 * (r["accuracy"][key]["mean"] or 0.0) for r in rows]
        stds = [100 * (r["accuracy"][key]["std"] or 0.0) for r in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
        expected = [(x, r["reference"][key]) for x, r in zip(xs, rows, strict=True) if r.get("reference") and key in r["reference"]]
        if expected:
            ax.scatter(*zip(*expected, strict=True), marker="_", s=200, color="black", zorder=3,
                       label="reference (expected)" if offset == 0 else None)
    ax.set_xticks(range(len(rows)), [r["label"].split(" (")[0] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['study']} on {report['dataset']}, {len(report['seeds'])} seed(s)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
