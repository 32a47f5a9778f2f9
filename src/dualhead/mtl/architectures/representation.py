"""One tensor for a representation made of several feature maps.

Gradient methods in representation mode take the tasks' Jacobian at one tensor, the model's declared
shared representation. Where the tasks read several maps (every level of a backbone, or every
task's column), `pack_levels` copies them into one ``[B, N]`` tensor and gives the maps back as views
of it: computing on the views makes every path from the maps to the tasks pass through that tensor,
so its gradient is the whole gradient that reaches the maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pack_levels(maps: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``[B, C_i, H_i, W_i]`` maps -> (``[B, sum C_i H_i W_i]`` tensor, the maps as views of it).

    Each sample's maps are stored channels-last (the layout the dense models run their
    convolutions in), so the views have channels-last strides within a sample.
    """
    if not maps:
        raise ValueError("pack_levels needs at least one feature map")
    batch = maps[0].shape[0]
    for index, x in enumerate(maps):
        if x.dim() != 4 or x.shape[0] != batch:
            raise ValueError(
                f"pack_levels: map {index} has shape {tuple(x.shape)}; expected [{batch}, C, H, W]"
            )
    packed = torch.cat([x.permute(0, 2, 3, 1).reshape(batch, -1) for x in maps], dim=1)
    views, offset = [], 0
    for x in maps:
        _, channels, height, width = x.shape
        size = channels * height * width
        views.append(
            packed[:, offset : offset + size].view(batch, height, width, channels).permute(0, 3, 1, 2)
        )
        offset += size
    return packed, views
