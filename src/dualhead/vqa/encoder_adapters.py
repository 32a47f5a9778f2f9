"""Per-task adapters or LoRA inside the Dual-Head VQA model's two encoders (``model.encoder_adapters``).

The adapters pattern of the design space, applied to VQA: the encoders' weights stay shared, and each
head (yes/no, open-ended) reads the image and the question encoded with modules of its own switched in
(`dualhead.mtl.architectures.TaskAdapters` after every vision block and transformer layer, or
`TaskLoRA` on every linear map and 1x1 convolution). A forward therefore runs each encoder once per
head. Every module starts as the identity, so features cached from the plain encoders are exact until
the modules first train (the end of the frozen warm-up).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dualhead.backbones.text import TextEncoder
from dualhead.backbones.vision import VisionEncoder
from dualhead.mtl.architectures import TaskAdapters, TaskHooks, TaskLoRA
from dualhead.vqa.config import EncoderAdaptersConfig


class EncoderAdapters(nn.Module):
    """One set of per-task modules in the vision encoder and one in the text encoder."""

    def __init__(self, config: EncoderAdaptersConfig, vision: VisionEncoder, text: TextEncoder, tasks: Sequence[str]):
        super().__init__()
        config.validate()
        if config.kind == "lora":
            self.vision: TaskHooks = TaskLoRA(vision.model, tasks, rank=config.rank, alpha=config.alpha)
            self.text: TaskHooks = TaskLoRA(text.model, tasks, rank=config.rank, alpha=config.alpha)
        else:
            size = vision.data_config["input_size"]
            self.vision = TaskAdapters(
                vision.model, tasks, torch.zeros(1, *size), config.reduction,
                channels_last=getattr(vision.model, "output_fmt", "NCHW") == "NHWC",
            )
            tokens = text.tokenize(["what is shown"])
            self.text = TaskAdapters(text.model, tasks, tokens, config.reduction, blocks=text.layers())

    @contextmanager
    def use(self, task: str | None) -> Iterator[None]:
        """Run both encoders with `task`'s modules (None: the plain encoders)."""
        with self.vision.use(task), self.text.use(task):
            yield

    def task_modules(self, task: str) -> list[nn.Module]:
        """`task`'s own modules in both encoders."""
        return [self.vision.tasks[task], self.text.tasks[task]]
