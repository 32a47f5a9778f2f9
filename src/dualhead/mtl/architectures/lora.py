"""Per-task LoRA (Hu et al., ICLR 2022) on a model's linear maps: its ``nn.Linear`` layers and its
1x1 convolutions (pointwise convolutions are linear maps of the channels).

Each task adds ``(alpha / rank) * B A x`` to every such layer's output, with ``A`` (rank x in)
initialised as LoRA does and ``B`` (out x rank) at zero, so the model starts as it was. The deltas
are attached with forward hooks (`TaskHooks`): ``with lora.use(task): model(x)``.

Why not `peft`: it is not a dependency here, and its multi-adapter switching (``set_adapter``) makes
every inactive adapter non-trainable, while a multi-task step trains every task's adapters at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dualhead.mtl.architectures.adapters import TaskHooks


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``nn.Linear`` layers and ungrouped 1x1 convolutions of `model`, in module order."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1)
    ]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer or 1x1 convolution for LoRA")
    return found


class LoRADelta(nn.Module):
    """``scale * B(A(x))`` for one linear layer or 1x1 convolution (same stride), B zero-initialised."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Linear):
            fan_in, fan_out = layer.in_features, layer.out_features
            self.stride: tuple[int, int] | None = None
        else:
            fan_in, fan_out = layer.in_channels, layer.out_channels
            self.stride = layer.stride
        rank = min(rank, fan_in, fan_out)
        self.A = nn.Parameter(layer.weight.new_empty(rank, fan_in))
        self.B = nn.Parameter(layer.weight.new_zeros(fan_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as LoRA's reference implementation and peft
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        if self.stride is None:
            return F.linear(F.linear(x, self.A), self.B) * self.scale
        low = F.conv2d(x, self.A[:, :, None, None], stride=self.stride)
        return F.conv2d(low, self.B[:, :, None, None]) * self.scale


class TaskLoRA(TaskHooks):
    """A LoRA delta per task on every linear map of `model` (`linear_layers`)."""

    def __init__(self, model: nn.Module, tasks: Sequence[str], rank: int = 4, alpha: float = 8.0):
        super().__init__(tasks)
        if rank < 1:
            raise ValueError(f"the LoRA rank must be >= 1, got {rank}")
        layers = linear_layers(model)
        for task in tasks:
            self.tasks[task] = nn.ModuleList(LoRADelta(layer, rank, alpha) for _, layer in layers)
        self.attach(layers)

    def apply(self, task_module: nn.Module, inputs: Tensor, output: Tensor) -> Tensor:
        return output + task_module(inputs).to(output.dtype)
