"""PNG plots of a run: loss and validation-metric curves, gradient conflict, from `metrics.jsonl`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dualhead.mtl.diagnostics import plot_diagnostics  # noqa: E402

log = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's `metrics.jsonl`; a torn last line (a run killed mid-write) is skipped with a
    warning, a corrupt line elsewhere is an error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning("%s: skipping its torn last line %d (%s)", path, number, err.msg)
                continue
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
    return rows


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


def plot_run(run_dir: Path) -> list[Path]:
    """Draw every plot the run's files allow; returns the PNGs written."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    written = []
    accuracy = [{k: v for k, v in r.items() if not k.startswith("val/") or k.endswith("accuracy")} for r in rows]
    other = [{k: v for k, v in r.items() if not k.startswith("val/") or not k.endswith("loss")} for r in rows]
    for plot_rows, prefix, title, name, kind in (
        (rows, "train/loss/", "training loss per task (epoch mean)", "loss.png", "epoch"),
        (rows, "loss/", "training loss per task", "loss_steps.png", "step"),
        (accuracy, "val/", "validation accuracy", "accuracy.png", "epoch"),
        (other, "val/", "validation metrics", "val_metrics.png", "epoch"),
    ):
        if name == "val_metrics.png" and (run_dir / "accuracy.png") in written:
            continue  # accuracy-scored runs (VQA) have their validation curves already
        if plot_curves(plot_rows, prefix, title, run_dir / name, kind):
            written.append(run_dir / name)
    diagnostics = [row for row in rows if row.get("kind") == "diagnostics"]
    if diagnostics:
        written.append(plot_diagnostics(diagnostics, run_dir / "gradient_conflict.png"))
    return written


