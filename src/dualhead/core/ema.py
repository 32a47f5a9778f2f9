"""An exponential moving average of a model's weights (``train.ema_decay``), evaluated in their place.

Polyak averaging as timm's ``ModelEmaV3`` and ``torch.optim.swa_utils`` do it, but over the parameters
that train at the time of each update only: a stage that freezes the encoders (VQA's frozen warm-up,
whose steps take milliseconds on cached features) does not pay for averaging weights that cannot
change. Buffers (batch-norm statistics) are copied, not averaged. The average lives beside the model
as plain tensors, so it is checkpointed and resumed with the trainer state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class WeightAverage:
    """``average = decay * average + (1 - decay) * weights`` after every optimiser step; the decay is
    warmed up as ``min(decay, (1 + step) / (10 + step))`` so that early weights do not dominate."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.model = model
        self.decay = decay
        self.average: dict[str, Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Start the average at the model's weights as they are now (after weights were loaded into it,
        e.g. a run's pretraining step: frozen weights are not averaged, so they must be current)."""
        self.average = {name: value.detach().clone() for name, value in self._state().items()}

    def _state(self) -> dict[str, Tensor]:
        return {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the model's current weights in (`step`: optimiser steps taken so far)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        averaged, current = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                averaged.append(self.average[name])
                current.append(param.detach())
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        for name, buffer in self.model.named_buffers():
            self.average[name].copy_(buffer)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own again after it."""
        state = self._state()
        own = {name: value.detach().clone() for name, value in state.items()}
        with torch.no_grad():
            for name, value in state.items():
                value.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in state.items():
                    value.copy_(own[name])

    def state_dict(self) -> dict[str, Tensor]:
        return {name: value.cpu() for name, value in self.average.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.average) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
        for name, value in self.average.items():
            value.copy_(state[name])
