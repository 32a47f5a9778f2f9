"""Checkpoints: the model (safetensors, via save_pretrained) plus the trainer state to resume.

A checkpoint directory is written beside its final name, fsynced, and swapped in with renames (the
parent directory fsynced after each), so a run killed while saving leaves the previous checkpoint
intact; `recover_interrupted` finishes or undoes a swap that was cut short.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualhead.core.io import fsync_dir

TRAINER_STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": [list(item) if isinstance(item, tuple) else item for item in random.getstate()],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model, trainer_state: dict[str, Any]) -> None:
    """Write model + trainer state to `directory` atomically (build aside, then swap)."""
    staging = directory.with_name(directory.name + ".tmp")
    previous = directory.with_name(directory.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    torch.save(trainer_state, staging / TRAINER_STATE_FILE)
    _fsync_tree(staging)
    shutil.rmtree(previous, ignore_errors=True)
    if directory.exists():
        directory.rename(previous)
    staging.rename(directory)
    fsync_dir(directory.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file of a freshly written checkpoint, then its directories."""
    for path in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            fsync_dir(path)
    fsync_dir(directory)


def recover_interrupted(directory: Path) -> None:
    """If a swap was interrupted after moving the old checkpoint aside, put it back."""
    previous = directory.with_name(directory.name + ".old")
    if not directory.exists() and previous.exists():
        previous.rename(directory)


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / TRAINER_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (is {directory.parent} a dualhead run directory?)")
    return torch.load(path, map_location="cpu", weights_only=True)
