"""Shared helpers of the benchmark scripts: the machine, timed training runs, mean and std."""

from __future__ import annotations

import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from dualhead.core.config import load_config
from dualhead.core.runtime import has_native_bf16
from dualhead.core.trainer import Trainer


def machine() -> str:
    """CPU model, cores, torch version (and the GPU, if one is used)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    text = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    text += ", native bf16" if has_native_bf16(torch.device("cpu")) else ", no native bf16 (precision=auto runs fp32)"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def train_once(config_name: str, overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    """Train one run from a bundled config; returns (results of `Trainer.fit`, wall seconds)."""
    config = load_config(config_name, overrides)
    config.train.progress = False
    started = time.perf_counter()
    results = Trainer(config, run_dir).fit()
    return results, time.perf_counter() - started


def mean_std(values: list[float]) -> str:
    """'mean ± std' in percent (std over seeds, sample standard deviation)."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def header(command: str) -> str:
    return f"Command: `{command}`  \nDate: {date.today().isoformat()}  \nMachine: {machine()}\n"
