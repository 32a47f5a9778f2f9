"""Per-task bottleneck adapters inside every block of a backbone (Houlsby et al., ICML 2019; Rebuffi
et al.'s residual adapters for CNNs, NeurIPS 2017).

An adapter adds ``up(act(down(x)))`` to a block's output, with ``up`` zero-initialised so that the
adapted backbone starts as the backbone itself. `TaskAdapters` owns one adapter per task and block
and attaches them with forward hooks, so the backbone keeps its module names (its weights load as
usual) and its parameters stay its own: ``with adapters.use(task): backbone(x)`` runs the backbone
with `task`'s adapters, outside the block the plain backbone. Each task therefore needs its own
backbone pass. `TaskHooks` is the switching mechanism, shared with LoRA (`dualhead.mtl.architectures.lora`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

#: timm's block containers: ``blocks`` (EfficientNet, MobileNet, Swin, ConvNeXt, ViT) and ResNet's ``layerN``.
BLOCK_CONTAINER = re.compile(r"(.*[._])?(blocks|layer\d+)")


def backbone_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of a timm model, in the order they run: the children of each block container, or,
    where a container holds stages (EfficientNet's ``blocks.<stage>``), the children of its stages."""
    found: list[tuple[str, nn.Module]] = []
    for name, container in model.named_modules():
        if not BLOCK_CONTAINER.fullmatch(name) or not isinstance(container, nn.Sequential):
            continue
        for child_name, child in container.named_children():
            if isinstance(child, nn.Sequential):
                found.extend((f"{name}.{child_name}.{n}", block) for n, block in child.named_children())
            else:
                found.append((f"{name}.{child_name}", child))
    if not found:
        raise ValueError(
            f"found no blocks in {type(model).__name__}: adapters go after the children of timm's block "
            "containers (a Sequential named 'blocks' or 'layer<N>')"
        )
    return found


class TaskHooks(nn.Module):
    """Per-task modules attached to layers of a model by forward hooks; ``use(task)`` switches them in.

    Subclasses fill ``self.tasks`` (task -> one module per hooked layer) and implement `apply`. The
    hooked model is not registered here (its owner holds it), so its parameters stay its own.
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"task modules need distinct task names, got {list(tasks)}")
        self.tasks = nn.ModuleDict()
        self.active: str | None = None
        self.layer_names: list[str] = []

    def attach(self, layers: Sequence[tuple[str, nn.Module]]) -> None:
        """Hook `layers` (name, module): layer ``i`` runs the active task's module ``i``."""
        self.layer_names = [name for name, _ in layers]
        for index, (_, layer) in enumerate(layers):
            layer.register_forward_hook(partial(self._hook, index))
        # A task absent from a batch gets no loss, but where every task's maps are packed into one
        # representation its modules still receive a zero gradient: drop it, so that an optimiser
        # with momentum leaves them alone as it does a head whose loss is absent.
        for param in self.tasks.parameters():
            param.register_post_accumulate_grad_hook(_drop_zero_gradient)

    def _hook(self, index: int, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self.active is None:
            return None
        return self.apply(self.tasks[self.active][index], args[0], output)

    def apply(self, task_module: nn.Module, inputs: Tensor, output: Tensor) -> Tensor:
        """The hooked layer's output with `task_module` applied."""
        raise NotImplementedError

    @contextmanager
    def use(self, task: str | None) -> Iterator[None]:
        """Run the hooked model with `task`'s modules (None: without any)."""
        if task is not None and task not in self.tasks:
            raise ValueError(f"no modules for task {task!r}; they exist for {', '.join(self.tasks)}")
        previous, self.active = self.active, task
        try:
            yield
        finally:
            self.active = previous


class BottleneckAdapter(nn.Module):
    """``x + up(GELU(down(x)))`` over the channel dimension `channel_dim`; ``up`` starts at zero."""

    def __init__(self, channels: int, bottleneck: int, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.down = nn.Linear(channels, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x.movedim(self.channel_dim, -1)
        return x + self.up(self.act(self.down(h))).movedim(-1, self.channel_dim)


class TaskAdapters(TaskHooks):
    """A bottleneck adapter per task after every block of `model`: `blocks` (name, module), by
    default timm's (`backbone_blocks`); a transformer's layers for a text encoder.

    `example` (an input `model` accepts, or its keyword arguments) is run once to size the adapters:
    channels are dim 1 of a block's 4-d output, or its last dim when `channels_last` (Swin's NHWC
    stages) or the output is a token sequence ``[B, N, C]``. Each adapter's bottleneck is
    ``channels // reduction`` (at least 1).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[str],
        example: Tensor | Mapping[str, Tensor],
        reduction: int = 4,
        channels_last: bool = False,
        blocks: Sequence[tuple[str, nn.Module]] | None = None,
    ):
        super().__init__(tasks)
        if reduction < 1:
            raise ValueError(f"the adapters' reduction must be >= 1, got {reduction}")
        blocks = backbone_blocks(model) if blocks is None else list(blocks)
        shapes = output_shapes(model, [block for _, block in blocks], example)
        sizes = []  # (channels, channel dim) of each block's output
        for (name, _), shape in zip(blocks, shapes, strict=True):
            dim = _channel_dim(shape, channels_last, name)
            sizes.append((shape[dim], dim))
        for task in tasks:
            self.tasks[task] = nn.ModuleList(
                BottleneckAdapter(channels, max(1, channels // reduction), dim) for channels, dim in sizes
            )
        self.attach(blocks)

    def apply(self, task_module: nn.Module, inputs: Tensor, output: Tensor) -> Tensor:
        return task_module(output)


def _channel_dim(shape: torch.Size, channels_last: bool, name: str) -> int:
    if len(shape) == 3 or (len(shape) == 4 and channels_last):
        return len(shape) - 1
    if len(shape) == 4:
        return 1
    raise ValueError(f"block {name} outputs shape {tuple(shape)}: adapters need [B, C, H, W], [B, H, W, C] or [B, N, C]")


@torch.no_grad()
def output_shapes(
    model: nn.Module, layers: Sequence[nn.Module], example: Tensor | Mapping[str, Tensor]
) -> list[torch.Size]:
    """The output shape of each of `layers` when `model` runs on `example` (keyword arguments when a
    mapping), in eval mode, so that batch-norm statistics stay as they are."""
    shapes: dict[int, torch.Size] = {}

    def record(index: int, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor):
            raise ValueError(f"{type(module).__name__} returns {type(output).__name__}, not a tensor")
        shapes[index] = output.shape

    handles = [layer.register_forward_hook(partial(record, index)) for index, layer in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        model(**example) if isinstance(example, Mapping) else model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [index for index in range(len(layers)) if index not in shapes]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(layers)} layers do not run in the model's forward")
    return [shapes[index] for index in range(len(layers))]


class TaskVector(nn.Module):
    """One task's learned embedding (a module, so that a model can declare it the task's own)."""

    def __init__(self, dim: int):
        super().__init__()
        self.vector = nn.Parameter(torch.randn(dim))


class TaskFiLM(nn.Module):
    """FiLM conditioning on the task (Perez et al., AAAI 2018): ``x * (1 + gamma_t) + beta_t`` per
    channel, with ``(gamma_t, beta_t)`` a shared linear map of task `t`'s learned embedding.

    ``embeddings[task]`` is the task's own, ``generator`` shared by every task; the generator starts
    at zero, so every task starts from the unmodulated layer.
    """

    def __init__(self, tasks: Sequence[str], channels: int, embedding_dim: int = 16):
        super().__init__()
        if not tasks or embedding_dim < 1:
            raise ValueError(f"FiLM needs tasks and an embedding_dim >= 1, got {list(tasks)} and {embedding_dim}")
        self.embeddings = nn.ModuleDict({task: TaskVector(embedding_dim) for task in tasks})
        self.generator = nn.Linear(embedding_dim, 2 * channels)
        nn.init.zeros_(self.generator.weight)
        nn.init.zeros_(self.generator.bias)

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Modulate the channels (dim 1) of `x` for `task`."""
        gamma, beta = self.generator(self.embeddings[task].vector).chunk(2)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * (1 + gamma.view(shape)) + beta.view(shape)



def _drop_zero_gradient(param: Tensor) -> None:
    if param.grad is not None and not bool(param.grad.any()):
        param.grad = None
