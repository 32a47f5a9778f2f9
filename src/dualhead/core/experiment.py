"""What an application hands the Trainer: the model, its tasks, its data and its evaluation.

The Trainer owns the loop (optimiser, schedule, balancer, checkpoints, resume, logging); the
`Experiment` owns everything that knows what a sample is. An application subclasses it and
overrides what differs (VQA: frozen-encoder stages with a feature cache, the router's loss, scoring
routed answers); the defaults fit models whose tasks each read ``output.predictions[task]``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dualhead.core.config import ConfigError, config_from_dict, config_to_dict
from dualhead.core.model import MultiTaskModel, MultiTaskOutput
from dualhead.core.runtime import autocast_context
from dualhead.core.task import Task


def dict_differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) wherever two nested dicts differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current), key=str):
            found += dict_differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return found
    return [] if saved == current else [(prefix.rstrip("."), saved, current)]


def inference(model: nn.Module, loader: Iterable[Any], step: Callable[[Any], Any], progress: bool = False) -> Iterator[Any]:
    """``step(batch)`` for every batch of `loader`, without gradients and with `model` in eval mode
    (its mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
                yield step(batch)
    finally:
        model.train(was_training)


class ResumableBatchSampler(Protocol):
    """A batch sampler whose epoch order is reproducible and can skip the batches already done."""

    seed: int

    @property
    def epoch_length(self) -> int: ...

    def set_epoch(self, epoch: int, skip: int = 0) -> None: ...


class Experiment:
    """Base class: model + tasks + data + evaluation for one run of an application."""

    #: Validation metric that picks ``best/`` when ``train.metric`` is null.
    default_metric: str = "loss"

    def __init__(self, config: Any, model: MultiTaskModel, tasks: Sequence[Task]):
        self.config = config
        self.model = model
        self.tasks = nn.ModuleDict({task.name: task for task in tasks})
        self.device = torch.device("cpu")

    # -- set-up ----------------------------------------------------------------------------------

    def to(self, device: torch.device) -> Experiment:
        self.device = device
        self.model.to(device)
        self.tasks.to(device)
        return self

    def autocast(self) -> AbstractContextManager:
        return autocast_context(self.device, self.config.train.precision)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def metric_directions(self) -> dict[str, bool]:
        """Every validation metric `evaluate` produces -> whether higher is better."""
        directions = {"loss": False}
        for name, task in self.tasks.items():
            directions.update({f"{name}/{metric}": higher for metric, higher in task.metrics.items()})
        return directions

    def check_checkpoint(self, directory: Path) -> None:
        """Refuse a checkpoint this experiment's model would load wrongly: the model configuration
        saved with it must be the one rebuilt from the run's config (an error names each key); a key
        the checkpoint lacks (an option added since) counts as its default."""
        saved_file = Path(directory) / "config.json"
        try:
            saved = json.loads(saved_file.read_text(encoding="utf-8")).get("model")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"cannot read the checkpoint's model configuration {saved_file}: {err}") from None
        if not isinstance(saved, dict):
            raise ValueError(f"the checkpoint's {saved_file} holds no model configuration: is {directory} a dualhead checkpoint?")
        model_config = getattr(self.model, "config", None)
        if model_config is not None:
            # Options added since the checkpoint was written take their defaults (off); with an
            # unknown key the comparison below names it.
            with contextlib.suppress(ConfigError):
                saved = config_to_dict(config_from_dict(type(model_config), saved))
        current = config_to_dict(model_config) if model_config is not None else None
        differences = sorted(dict_differences(saved, current)) if current is not None else []
        if differences:
            raise ValueError(
                f"the checkpoint {directory} does not fit this run's configuration: "
                + "; ".join(f"model.{key}: checkpoint {a!r}, run {b!r}" for key, a, b in differences)
            )

    def default_balancer_options(self, balancer: str) -> dict[str, Any]:
        """Options a balancer gets when ``train.balancer_options`` is empty."""
        return {}

    @property
    def stage_boundary_epoch(self) -> int:
        """Epoch where a second training stage starts (0: one stage). The schedule may restart there,
        and early stopping's patience counts only from there."""
        return 0

    # -- data --------------------------------------------------------------------------------------

    @property
    def train_sampler(self) -> ResumableBatchSampler:
        raise NotImplementedError

    def train_loader(self) -> DataLoader:
        """The loader of the current stage (built over `train_sampler`)."""
        raise NotImplementedError

    def eval_loader(self, split: str) -> DataLoader:
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        raise NotImplementedError

    def prepare(self, run_dir: Path) -> None:
        """Work a new run does once, before its first step, writing into `run_dir` (VQA: contrastive
        pretraining of the encoders). Every process calls it. Nothing by default."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (and before predicting): freeze, cache, rebuild loaders."""

    def batch_size_of(self, batch: Any) -> int:
        """Samples in a batch (for throughput figures)."""
        return len(batch)

    # -- a step ------------------------------------------------------------------------------------

    def to_device(self, batch: Any) -> Any:
        return batch.to(self.device)

    def forward(self, batch: Any) -> MultiTaskOutput:
        return self.model(batch)

    def task_losses(self, output: MultiTaskOutput, batch: Any) -> dict[str, Tensor]:
        """The loss of every task with labelled samples in `batch` (others are left out)."""
        losses = {name: task.loss(output.predictions[name], batch) for name, task in self.tasks.items()}
        return {name: loss for name, loss in losses.items() if loss is not None}

    def auxiliary_loss(self, output: MultiTaskOutput, batch: Any) -> Tensor | None:
        """A loss outside balancing, already weighted (VQA's question-type router); by default the
        model's own regulariser (`TaskOutputs.auxiliary_loss`), if its output carries one."""
        return getattr(output, "auxiliary_loss", None)

    # -- evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, split: str, final: bool = False) -> dict[str, Any]:
        """Every task's metrics on `split` (``"<task>/<metric>"``) and the mean task loss."""
        meters = {name: task.meter() for name, task in self.tasks.items()}
        totals = dict.fromkeys(self.tasks, 0.0)
        counts = dict.fromkeys(self.tasks, 0)
        for batch, output in self.predict_batches(self.eval_loader(split)):
            for name, loss in self.task_losses(output, batch).items():
                totals[name] += float(loss)
                counts[name] += 1
            for name, meter in meters.items():
                meter.update(output.predictions[name].float(), batch)
        metrics: dict[str, Any] = {}
        for name, meter in meters.items():
            metrics.update({f"{name}/{key}": value for key, value in meter.compute().items()})
            metrics[f"{name}/loss"] = totals[name] / max(counts[name], 1)
        metrics["loss"] = sum(metrics[f"{name}/loss"] for name in self.tasks) / max(len(self.tasks), 1)
        return metrics

    def predict_batches(self, loader: Iterable[Any]) -> Iterator[tuple[Any, MultiTaskOutput]]:
        """(batch, output) over `loader` in eval mode, under the run's precision."""

        def step(batch: Any) -> tuple[Any, MultiTaskOutput]:
            batch = self.to_device(batch)
            with self.autocast():
                return batch, self.forward(batch)

        return inference(self.model, loader, step, self.config.train.progress)

    def report(self, results: Mapping[str, Any]) -> str:
        """Markdown of the final results (``{split: metrics}``)."""
        lines = []
        for split, metrics in results.items():
            if not isinstance(metrics, Mapping):
                continue
            lines += [f"### {split} ({Path(results['checkpoint']).name})", "", "| metric | value |", "| --- | ---: |"]
            lines += [f"| {key} | {value:.4f} |" for key, value in metrics.items() if isinstance(value, int | float)]
            lines.append("")
        return "\n".join(lines)

    def plot(self, run_dir: Path, results: Mapping[str, Any]) -> list[Path]:
        """Application plots of the final results (the core draws the curves)."""
        return []
