"""Gradient-conflict diagnostics at the shared representation and their plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dualhead.mtl.diagnostics import gradient_conflict, plot_diagnostics


def test_gradient_conflict_norms_cosines_and_graph_kept():
    theta = torch.tensor([1.0, 2.0, -1.0], requires_grad=True)
    features = theta * 2.0
    # d/df: binary (3, 0, 0); open (1, 1, 0); count (-2, 0, 0) — norms 3, sqrt 2, 2.
    losses = {
        "binary": 3 * features[0],
        "open": features[0] + features[1],
        "count": -2 * features[0],
    }
    result = gradient_conflict(losses, features)
    assert result == pytest.approx(
        {
            "grad_norm/binary": 3.0,
            "grad_norm/open": math.sqrt(2),
            "grad_norm/count": 2.0,
            "cosine/binary~open": 1 / math.sqrt(2),
            "cosine/binary~count": -1.0,
            "cosine/open~count": -1 / math.sqrt(2),
        }
    )
    sum(losses.values()).backward()  # the graph survived; d/dtheta = 2 * (3 + 1 - 2, 1, 0)
    assert theta.grad.tolist() == [4.0, 2.0, 0.0]


def test_gradient_conflict_zero_gradient_has_zero_cosine():
    features = torch.ones(2, requires_grad=True) * 1.0
    result = gradient_conflict({"a": features.sum(), "b": (features * 0).sum()}, features)
    assert result["grad_norm/b"] == 0.0 and result["cosine/a~b"] == 0.0


def test_plot_diagnostics_writes_png(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    rows = [
        {
            "step": s,
            "loss": 1.0,
            "grad_norm/binary": 1 / (s + 1),
            "grad_norm/open": 0.5,
            "cosine/binary~open": math.cos(s),
        }
        for s in range(5)
    ]
    rows.insert(2, {"epoch": 0, "val/accuracy": 0.5})  # rows without a step are skipped
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    png = plot_diagnostics(jsonl, tmp_path / "plots" / "conflict.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_diagnostics_errors_name_the_file(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text('{"step": 1, "grad_norm/a": 1.0}\n{"step": 2,\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not JSON"):
        plot_diagnostics(jsonl, tmp_path / "x.png")
    jsonl.write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: no rows"):
        plot_diagnostics(jsonl, tmp_path / "x.png")
    with pytest.raises(ValueError, match="not found"):
        plot_diagnostics(tmp_path / "missing.jsonl", tmp_path / "x.png")
