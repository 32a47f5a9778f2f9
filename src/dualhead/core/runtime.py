"""Device, precision and seeding: the few lines every run and every tool needs the same way."""

from __future__ import annotations

import random
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("auto", "bf16", "fp32")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA where there is one), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; choose one of {', '.join(DEVICES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for, but CUDA is not available here; use cpu or auto")
    return device


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX. Elsewhere (an AVX2-only CPU) bf16 matrix products are emulated: 1 against
    171 GFLOP/s in float32 on an AMD EPYC Zen 3 (benchmarks/encoder_speed.py)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(device: torch.device, precision: str) -> str:
    """``bf16`` or ``fp32`` for `precision` on `device`: ``auto`` is bf16 where the hardware has it."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown train.precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on CPU and CUDA, or nothing for fp32 (``auto``: see `resolve_precision`)."""
    if resolve_precision(device, precision) == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def derived_seed(*parts: int) -> int:
    """A 32-bit seed mixed from several integers (a run's seed and a rank, an epoch, a step)."""
    return int(np.random.SeedSequence([int(part) % 2**64 for part in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
