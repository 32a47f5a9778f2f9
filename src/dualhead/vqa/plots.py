"""VQA plots: the binary head's confusion matrix, and a study's accuracy per configuration."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
