"""Freezing a module: no gradients, and eval mode (batch-norm statistics, dropout) whatever its parent asks."""

from __future__ import annotations

from torch import nn


class _EvalOnlyTrain:
    """Stands in for a frozen module's ``train``: whatever mode is asked for, the module stays in eval."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze_module(module: nn.Module) -> nn.Module:
    """Freeze `module` in place: no gradients, and eval mode (batch-norm statistics, dropout) even
    when a parent calls ``.train()``. Returns the module."""
    module.requires_grad_(False)
    module.train = _EvalOnlyTrain(module)
    return module.eval()


def unfreeze_module(module: nn.Module) -> nn.Module:
    """Undo `freeze_module`: gradients on, and ``train`` follows the parent again. Returns the module."""
    module.__dict__.pop("train", None)
    module.requires_grad_(True)
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether `freeze_module` was applied to `module`."""
    return isinstance(module.__dict__.get("train"), _EvalOnlyTrain)


def batchnorm_eval(module: nn.Module) -> None:
    """Put every batch-norm layer of `module` in eval mode: they keep their running statistics (few
    distinct images per batch make poor batch statistics) while the rest of `module` trains."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()


class NormEvalModule(nn.Module):
    """A backbone whose batch norm keeps its running statistics while the rest trains (`norm_eval`),
    and that says whether `freeze_module` froze it."""

    norm_eval: bool = False

    def train(self, mode: bool = True) -> NormEvalModule:
        super().train(mode)
        if mode and self.norm_eval:
            batchnorm_eval(self)
        return self

    @property
    def frozen(self) -> bool:
        return is_frozen(self)
