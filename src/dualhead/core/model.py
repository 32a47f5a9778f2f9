"""The multi-task model protocol: per-task predictions, declared shared parameters, parameter groups.

LibMTL-style: one base class owns the shared part and the task-specific parts and says which is
which, so trainers, balancers and diagnostics never name an application's modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class MultiTaskOutput(Protocol):
    """What a multi-task forward returns: a prediction per task and the shared representation(s)."""

    @property
    def predictions(self) -> Mapping[str, Tensor]: ...

    @property
    def shared(self) -> Mapping[str, Tensor]: ...


@dataclass
class TaskOutputs:
    """A plain `MultiTaskOutput`: predictions by task name, shared representations by name."""

    predictions: dict[str, Tensor]
    shared: dict[str, Tensor] = field(default_factory=dict)
    #: A regulariser of the model's own, already weighted (a sluice network's orthogonality penalty),
    #: added outside the balancing as the experiment's auxiliary loss; None where there is none.
    auxiliary_loss: Tensor | None = None


class MultiTaskModel(nn.Module):
    """Base class of every multi-task model.

    Subclasses implement `forward` (returning a `MultiTaskOutput`) and `shared_modules`; they may
    name `pretrained_modules` (trained at the lower ``train.encoder_lr``).
    """

    #: Whether every row of the shared representation feeds every task, as dense tasks labelled on
    #: the same pixels do. False where each sample carries one task's label (a VQA question): there
    #: the tasks' gradients sit on disjoint rows and cannot conflict, so gradient methods must act
    #: on the shared parameters instead.
    representation_shared_by_tasks: bool = True
    #: The key of `MultiTaskOutput.shared` that the task heads read (the last shared representation).
    representation_key: str = "features"

    def shared_modules(self) -> list[nn.Module]:
        """The modules every task's loss flows through (the backbone, the fusion)."""
        raise NotImplementedError

    def pretrained_modules(self) -> list[nn.Module]:
        """Modules that start from pretrained weights (their parameters get ``train.encoder_lr``)."""
        return []

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the shared modules, in a fixed order."""
        return [p for module in self.shared_modules() for p in module.parameters() if p.requires_grad]

    def conflict_parameters(self) -> list[nn.Parameter]:
        """Where gradient conflict is measured and gradient methods act: by default every shared
        parameter; a model may declare a subset (its last shared block) to make that cheaper."""
        return self.shared_parameters()

    def parameter_groups(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(role, parameter) for every trainable parameter; role ``"pretrained"`` or ``"new"``."""
        pretrained = {id(p) for module in self.pretrained_modules() for p in module.parameters()}
        for param in self.parameters():
            if param.requires_grad:
                yield ("pretrained" if id(param) in pretrained else "new"), param
