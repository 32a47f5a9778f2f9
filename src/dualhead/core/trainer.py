"""The training loop for every application: data -> model -> per-task losses -> balancer -> optimiser.

A run directory holds `config.yaml` (what the run used), `metrics.jsonl` and TensorBoard events,
`best/` and `last/` checkpoints, plots, and the final `test_metrics.json` / `results.md`. What a
sample is, how the model is fed and how it is scored is the application's `Experiment`.

Several processes (``torchrun --nproc-per-node N -m dualhead train ...``, see
`dualhead.core.distributed`): each step's global batch is one batch per process; every process gets
the same tasks with the global batch's loss values and its own share of their gradients, and the
model's gradients are summed over processes before clipping and the optimiser step, so the update is
the one a single process computes over the global batch. Rank 0 alone evaluates, writes and plots; the
others get its validation metrics, so all take the same decisions (best checkpoint, early stopping).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from dualhead.core import distributed
from dualhead.core.applications import get_application
from dualhead.core.checkpoints import (
    TRAINER_STATE_FILE,
    load_trainer_state,
    recover_interrupted,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dualhead.core.config import RunConfig, load_config, save_config
from dualhead.core.ema import WeightAverage
from dualhead.core.experiment import Experiment
from dualhead.core.io import atomic_write_json, atomic_write_text
from dualhead.core.plots import plot_run
from dualhead.core.runtime import PRECISIONS, derived_seed, resolve_precision, seed_everything
from dualhead.mtl.balancers import BalanceReport, build_balancer
from dualhead.mtl.diagnostics import gradient_conflict

log = logging.getLogger(__name__)

AUXILIARY = "aux"  # the auxiliary loss's name among the losses (logs, multi-process counts)


class TrainingDiverged(RuntimeError):
    """A loss, gradient or weight became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class StepResult:
    """What one `Trainer.train_step` did."""

    losses: dict[str, float]  # per task present in the batch (and "aux" for the auxiliary loss)
    report: BalanceReport
    stepped: bool  # whether the optimiser stepped (the last batch of a gradient-accumulation group)
    diagnostics: dict[str, float] = field(default_factory=dict)


def build_experiment(config: RunConfig) -> Experiment:
    """The experiment of the application `config` belongs to."""
    return get_application(config.application).build_experiment(config)


class Trainer:
    """Trains an `Experiment`'s model as `config.train` says, writing everything into `run_dir`."""

    def __init__(self, config: RunConfig, run_dir: Path | str, experiment: Experiment | None = None):
        """`experiment`: one built beforehand (tests, benchmarks); otherwise the application builds it
        after seeding, so its model's initialisation follows ``train.seed``."""
        self.config = config
        self.run_dir = Path(run_dir)
        cfg = config.train
        validate_train_config(cfg)
        self.device = distributed.setup(cfg.device)  # joins the other processes under torchrun
        seed_everything(cfg.seed)
        self.experiment = (experiment or build_experiment(config)).to(self.device)
        self.model = self.experiment.model
        if distributed.is_distributed():
            distributed.broadcast_module(self.model)  # the same initial weights everywhere
            seed_everything(derived_seed(cfg.seed, distributed.rank()))  # each process its own dropout
        self.metric = cfg.metric or self.experiment.default_metric
        directions = self.experiment.metric_directions
        if self.metric not in directions:
            raise ValueError(f"unknown train.metric {self.metric!r}; this run produces {', '.join(directions)}")
        self.higher_is_better = directions[self.metric]
        self.balancer = self._build_balancer().to(self.device)
        self.optimizer = self._build_optimizer()  # before any stage freezes: it holds every trainable parameter
        self.sampler = self.experiment.train_sampler
        if distributed.is_distributed():
            self._shard_sampler()
        self.total_steps = cfg.max_steps or self._steps_in_epochs(cfg.epochs)
        self.scheduler = self._build_scheduler()
        # the moving average of the weights that validation, best/ and the final scores use
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.state: dict[str, Any] = {"epoch": 0, "batches_done": 0, "step": 0, "best": None, "bad_epochs": 0, "stopped": False}
        self.writer: SummaryWriter | None = None
        self._recovered_best_step: int | None = None
        self._unweighted: set[str] = set()

    # -- construction -----------------------------------------------------------------------------

    def _build_balancer(self):
        cfg = self.config.train
        options = {**self.experiment.default_balancer_options(cfg.balancer), **cfg.balancer_options}
        balancer = build_balancer(cfg.balancer, self.experiment.task_names, **options)
        if getattr(balancer, "mode", None) == "representation" and not self.model.representation_shared_by_tasks:
            raise ValueError(
                f"balancer {cfg.balancer!r} in representation mode cannot act on this model: each sample is labelled "
                "for one task, so the tasks' gradients at the per-sample shared representation lie on disjoint rows "
                "and never conflict there. Use train.balancer_options.mode=parameters (the default)."
            )
        if getattr(balancer, "mode", None) == "parameters" and not self.model.shared_parameters():
            raise ValueError(
                f"balancer {cfg.balancer!r} acts on the parameters every task shares, and this model shares none "
                "that train (e.g. per-task adapters on a frozen backbone): each task trains only its own "
                "parameters on its own loss. Use a loss weighting (train.balancer=fixed, uw, dwa, ...)."
            )
        return balancer

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; pretrained modules at `encoder_lr`, new layers at `lr`; no decay on biases and norms."""
        cfg = self.config.train
        groups: dict[tuple[str, float], list[torch.nn.Parameter]] = {}
        for role, param in self.model.parameter_groups():
            decay = cfg.weight_decay if param.ndim > 1 else 0.0
            groups.setdefault((role, decay), []).append(param)
        lrs = {"pretrained": cfg.encoder_lr, "new": cfg.lr}
        param_groups = [{"params": params, "lr": lrs[role], "weight_decay": decay, "role": role} for (role, decay), params in groups.items()]
        balancer_params = [p for p in self.balancer.parameters() if p.requires_grad]
        if balancer_params:
            param_groups.append({"params": balancer_params, "lr": self.balancer.lr, "weight_decay": 0.0, "role": "balancer"})
        # The fused kernel is far faster than the default for-each kernel on CPU (a large share of a step).
        return torch.optim.AdamW(param_groups, fused=self.device.type in ("cpu", "cuda"))

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warm-up then cosine decay, once over the run or (`finetune_schedule=restart`) once
        per stage of the experiment."""
        cfg = self.config.train
        boundary = 0
        stage = self.experiment.stage_boundary_epoch
        if cfg.finetune_schedule == "restart" and 0 < stage < cfg.epochs and cfg.max_steps is None:
            boundary = self._steps_in_epochs(stage)
        finetune_scale = (cfg.finetune_lr / cfg.lr) if cfg.finetune_lr is not None else 1.0
        lambdas = []
        for group in self.optimizer.param_groups:
            scale = finetune_scale if group.get("role") == "new" else 1.0
            lambdas.append(staged_cosine(boundary, max(self.total_steps, 1), cfg.warmup_fraction, scale))
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)

    def _shard_sampler(self) -> None:
        if not isinstance(self.sampler, distributed.ShardableBatchSampler):
            raise ValueError(
                f"the training sampler {type(self.sampler).__name__} of application "
                f"{self.config.application!r} cannot share its batches among processes: subclass "
                "dualhead.core.distributed.ShardableBatchSampler"
            )
        self.sampler.shard(distributed.rank(), distributed.world_size())

    def _steps_in_epochs(self, epochs: int) -> int:
        """Optimiser steps in the first `epochs` epochs (the schedule's length)."""
        steps = 0
        for epoch in range(epochs):
            self.sampler.set_epoch(epoch)
            steps += math.ceil(self.sampler.epoch_length / self.config.train.grad_accum)
        self.sampler.set_epoch(0)
        return steps

    # -- resume -----------------------------------------------------------------------------------

    @classmethod
    def resume(cls, run_dir: Path | str) -> Trainer:
        """Continue a stopped run from its `last/` checkpoint: weights, optimiser, scheduler, RNG, counters.
        A run that stopped before its first checkpoint starts again from the beginning. Every process
        of a multi-process run loads the same checkpoint (with several machines, `run_dir` must be on a
        file system they share), and the run must resume with as many processes as it had."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"cannot resume: {config_path} not found; is {run_dir} a dualhead run directory?")
        trainer = cls(load_config(config_path), run_dir)
        if distributed.is_main():
            for name in ("last", "best"):
                recover_interrupted(run_dir / name)
        distributed.barrier()
        if not (run_dir / "last").exists():
            log.warning("%s has no checkpoint yet: training starts from the beginning", run_dir)
            return trainer
        trainer.experiment.check_checkpoint(run_dir / "last")
        state = load_trainer_state(run_dir / "last")
        saved_world = state.get("world_size", 1)
        if saved_world != distributed.world_size():
            raise ValueError(
                f"{run_dir} was trained by {saved_world} process(es), this resume runs "
                f"{distributed.world_size()}: a step's global batch and the schedule's length depend on it; "
                f"resume with torchrun --nproc-per-node {saved_world} (or without torchrun for 1)"
            )
        trainer.model.load_weights(run_dir / "last", trainer.device)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.balancer.load_state_dict(state["balancer"])
        if trainer.ema is not None:
            if "ema" not in state:
                raise ValueError(f"{run_dir / 'last'} holds no weight average, but the run's config sets train.ema_decay")
            trainer.ema.load_state_dict(state["ema"])
        trainer.state = state["progress"]
        trainer._recover_best()
        set_rng_state(state["rank_rng"][distributed.rank()] if "rank_rng" in state else state["rng"])
        return trainer

    def _recover_best(self) -> None:
        """A run killed between saving `best/` and `last/` has a `best/` newer than `last/` knows:
        keep its score, so a worse model never overwrites it."""
        best_dir = self.run_dir / "best"
        if not (best_dir / TRAINER_STATE_FILE).is_file():
            return
        progress = load_trainer_state(best_dir)["progress"]
        saved, current = progress.get("best"), self.state["best"]
        if saved is not None and (current is None or self._better(saved, current)):
            self.state["best"] = saved
            # the resumed run repeats the epoch that scored it: equalling it there is no bad epoch
            self._recovered_best_step = progress["step"]

    def save(self, name: str) -> None:
        """Checkpoint the model and everything needed to resume into ``run_dir/name``. Non-finite
        weights are never written (finite gradients keep them finite between checkpoints, so the
        check runs here, not on every step). Every process calls it; rank 0 writes."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            self._diverged(f"non-finite weights at step {self.state['step']}: not saved to {name}/")
        rng_states = distributed.all_gather_objects(rng_state())  # every process's, to resume each
        if not distributed.is_main():
            return
        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "progress": dict(self.state),
            "rng": rng_states[0],
            "world_size": len(rng_states),
        }
        if len(rng_states) > 1:
            trainer_state["rank_rng"] = rng_states
        if self.ema is not None:
            trainer_state["ema"] = self.ema.state_dict()
        save_checkpoint(self.run_dir / name, self.model, trainer_state)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train until the epoch budget, `max_steps` or early stopping; then test the best checkpoint."""
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            log.info("run directory: %s (%d process(es))", self.run_dir, distributed.world_size())
            log.info("device %s, precision %s (train.precision=%s)", self.device,
                     resolve_precision(self.device, self.config.train.precision), self.config.train.precision)
        if self.state["step"] == 0 and self.state["batches_done"] == 0:  # new (or killed before its first step)
            random_state = rng_state()  # training draws the same numbers with or without the preparation
            self.experiment.prepare(self.run_dir)
            set_rng_state(random_state)
            if self.ema is not None:
                self.ema.reset()  # the preparation may have loaded weights (pretrained encoders)
        try:
            while not self._finished():
                self.experiment.on_epoch_start(self.state["epoch"])
                if not self._train_epoch(self.state["epoch"]):  # max_steps reached mid-epoch
                    break
        finally:
            if self.writer is not None:
                self.writer.close()
        return self._finish()

    def _finished(self) -> bool:
        cfg = self.config.train
        return (
            self.state["stopped"]
            or self.state["epoch"] >= cfg.epochs
            or (cfg.max_steps is not None and self.state["step"] >= cfg.max_steps)
        )

    def _train_epoch(self, epoch: int) -> bool:
        """One epoch (or the rest of it, after a resume); True when it ran to its end."""
        cfg = self.config.train
        self.model.train()
        self.balancer.set_epoch(epoch)
        skip = self.state["batches_done"]  # resuming mid-epoch: the epoch's order is reproducible
        self.sampler.set_epoch(epoch, skip=skip)
        loader = self.experiment.train_loader()
        seed = cfg.seed * 1_000_003 + epoch  # worker seeds, per epoch (and per process)
        if distributed.is_distributed():
            seed = derived_seed(seed, distributed.rank())
        loader.generator.manual_seed(seed)
        epoch_length = self.sampler.epoch_length
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        samples = 0
        started = time.perf_counter()
        show = cfg.progress and distributed.is_main()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
        for index, batch in enumerate(bar, start=skip):
            last_of_group = (index + 1) % cfg.grad_accum == 0 or index + 1 == epoch_length
            result = self.train_step(batch, optimizer_step=last_of_group, where=f"epoch {epoch + 1}, batch {index + 1}")
            samples += self.experiment.batch_size_of(batch)
            if result.diagnostics:
                self._log("diagnostics", result.diagnostics)
            for name, value in result.losses.items():
                totals[name] = totals.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
            self.state["batches_done"] = index + 1
            if result.stepped:
                bar.set_postfix(loss=f"{result.report.loss:.3f}")
                step = self.state["step"]
                if cfg.log_every_steps and step % cfg.log_every_steps == 0:
                    self._log("step", {**{f"loss/{k}": v for k, v in result.losses.items()},
                                       **{f"weight/{k}": v for k, v in result.report.weights.items()},
                                       "lr": self.scheduler.get_last_lr()[0]})
                if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                    self.save("last")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
        seconds = time.perf_counter() - started
        (samples,) = distributed.sum_over_processes([samples])
        epoch_done = self.state["batches_done"] >= epoch_length
        metrics: dict[str, Any] = {f"train/loss/{k}": totals[k] / counts[k] for k in totals}
        metrics["train/seconds"] = seconds
        metrics["train/samples_per_second"] = samples / seconds if seconds > 0 else 0.0
        if epoch_done or (cfg.max_steps is not None and self.state["step"] >= cfg.max_steps):
            metrics.update(self._validate(epoch))
            if epoch_done:
                self.state["epoch"] = epoch + 1
                self.state["batches_done"] = 0
            self._log("epoch", metrics)
            self.save("last")
        return epoch_done

    def train_step(self, batch: Any, optimizer_step: bool = True, where: str = "") -> StepResult:
        """One batch: forward, per-task losses, the balancer's backward, and (unless accumulating
        gradients) clipping and an optimiser step. Non-finite losses or gradients stop the run.
        With several processes, every process calls it with its share of the step's global batch; the
        losses reported are the global batch's."""
        cfg = self.config.train
        batch = self.experiment.to_device(batch)
        with self.experiment.autocast():
            output = self.experiment.forward(batch)
            task_losses = self.experiment.task_losses(output, batch)
            aux = self.experiment.auxiliary_loss(output, batch)
        if distributed.is_distributed():
            task_losses, aux = self._global_losses(task_losses, aux, output, batch)
        losses = {task: float(loss.detach()) for task, loss in task_losses.items()}
        if aux is not None:
            losses[AUXILIARY] = float(aux.detach())
        where = where or f"step {self.state['step']}"
        if not all(math.isfinite(value) for value in losses.values()):
            self._diverged(f"non-finite loss at {where}: {losses}")
        diagnostics = {}
        every = cfg.diagnostics_every_steps
        if every and len(task_losses) > 1 and self.state["step"] % every == 0 and optimizer_step:
            conflict_params = self.model.conflict_parameters()
            if conflict_params:  # none where nothing trainable is shared (adapters on a frozen backbone)
                diagnostics = gradient_conflict(task_losses, conflict_params)
        scale = 1.0 / cfg.grad_accum
        # a randomised balancer (RLW, PCGrad's task order, GradDrop) draws the same on every process
        draws = derived_seed(cfg.seed, self.state["epoch"], self.state["step"], self.state["batches_done"])
        with distributed.same_random_draws(draws, self.device):
            report = self.balancer.backward(
                {task: loss * scale for task, loss in task_losses.items()},
                shared_params=self.model.shared_parameters(),
                shared_features=output.shared.get(self.model.representation_key),
                extra_loss=aux * scale if aux is not None else None,
                epoch=self.state["epoch"],
                step=self.state["step"],
            )
        if optimizer_step:
            self._optimizer_step(where)
        return StepResult(losses, report, optimizer_step, diagnostics)

    def _global_losses(self, task_losses: dict[str, Tensor], aux: Tensor | None, output: Any, batch: Any):
        """The task losses and the auxiliary loss valued over the global batch, carrying this process's
        share of their gradients (`distributed.global_mean_shares`): a task's loss is a mean over its
        labelled samples (`Task.loss_count`), the auxiliary loss one over the batch's samples."""
        counts: dict[str, float] = {}
        for name, task in self.experiment.tasks.items():
            count = task.loss_count(batch) if name in task_losses else 0
            if count is None:  # the task cannot say: processes weigh equally
                self._warn_unweighted(name)
                count = 1
            counts[name] = count
        means: dict[str, Tensor | None] = dict(task_losses)
        counts[AUXILIARY] = self.experiment.batch_size_of(batch) if aux is not None else 0
        means[AUXILIARY] = aux
        representation = output.shared.get(self.model.representation_key)
        anchors = {name: output.predictions.get(name, representation) for name in self.experiment.tasks}
        anchors[AUXILIARY] = representation
        shares = distributed.global_mean_shares(means, counts, anchors)
        return {name: shares[name] for name in self.experiment.tasks if name in shares}, shares.get(AUXILIARY)

    def _warn_unweighted(self, task: str) -> None:
        if task not in self._unweighted:
            self._unweighted.add(task)
            log.warning("task %r does not count its labelled samples (Task.loss_count): processes weigh its "
                        "loss equally, which matches one process only when they hold equally many", task)

    def _optimizer_step(self, where: str) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        distributed.all_reduce_gradients(params)  # the global batch's gradient, on every process
        clip = self.config.train.grad_clip
        # The model's gradients only: a balancer's own parameters follow their own rule.
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        if not torch.isfinite(norm):
            self._diverged(f"non-finite gradient at {where} (gradient norm {float(norm)})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state["step"] += 1
        if self.ema is not None:
            self.ema.update(self.state["step"])

    def _diverged(self, message: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"{message}; the last good checkpoint is {self.run_dir / 'last'}")

    # -- evaluation -------------------------------------------------------------------------------

    def _validate(self, epoch: int) -> dict[str, Any]:
        if not self.experiment.has_split("val"):
            return {}
        with self._averaged_weights():  # validation scores, and best/ holds, the averaged weights
            # rank 0 evaluates; every process takes the same decisions from its metrics
            metrics = self.experiment.evaluate("val") if distributed.is_main() else None
            metrics = distributed.broadcast_object(metrics)
            value = metrics.get(self.metric)
            best = self.state["best"]
            improved = value is not None and (
                best is None or self._better(value, best) or (value == best and self.state["step"] == self._recovered_best_step)
            )
            if improved:
                self.state["best"] = value
                self.state["bad_epochs"] = 0
                self.save("best")
        if value is None:  # e.g. no validation question of the task the metric scores
            log.warning("validation gave no %s this epoch: best/ not updated", self.metric)
        elif not improved and epoch >= self.experiment.stage_boundary_epoch:  # a first stage's plateau does not count
            self.state["bad_epochs"] += 1
            patience = self.config.train.early_stopping_patience
            if patience is not None and self.state["bad_epochs"] >= patience:
                log.info("early stopping after epoch %d: no better val %s for %d epochs", epoch + 1, self.metric, patience)
                self.state["stopped"] = True
        return {f"val/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}

    def _averaged_weights(self):
        """The model holds the weight average (``train.ema_decay``) inside the block; its own without one."""
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    def _finish(self) -> dict[str, Any]:
        """Evaluate the best checkpoint (or the last, without validation data) on val and test; plot.
        Rank 0 evaluates and writes; every process returns its results."""
        exists = distributed.broadcast_object([(self.run_dir / name).exists() for name in ("best", "last")])
        chosen = self.run_dir / ("best" if exists[0] else "last")
        if not any(exists):
            self.save("last")
        distributed.barrier()  # rank 0's checkpoint is complete before any process reads it
        self.model.load_weights(chosen, self.device)
        splits = [split for split in ("val", "test") if self.experiment.has_split(split)]
        if splits:  # on every process: a change of stage may build a feature cache together
            self.experiment.on_epoch_start(self.state["epoch"])
        results: dict[str, Any] = {"checkpoint": str(chosen)}
        # best/ already holds the weight average; last/ (no validation split) holds the model's own
        averaged = self._averaged_weights() if not exists[0] else nullcontext()
        if distributed.is_main():
            with averaged:
                for split in splits:
                    results[split] = self.experiment.evaluate(split, final=True)
            atomic_write_json(self.run_dir / "test_metrics.json", results)
            atomic_write_text(self.run_dir / "results.md", self.experiment.report(results) + "\n")
            plot_run(self.run_dir)
            self.experiment.plot(self.run_dir, results)
        return distributed.broadcast_object(results)

    def _log(self, kind: str, metrics: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        row = {"kind": kind, "epoch": self.state["epoch"], "step": self.state["step"],
               "time": datetime.now().isoformat(timespec="seconds"), **metrics}
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(key if kind == "epoch" else f"step/{key}", value, self.state["step"])


def validate_train_config(cfg) -> None:
    """Options that cannot work fail before any work starts, one line each."""
    if cfg.epochs < 1 and cfg.max_steps is None:
        raise ValueError(f"train.epochs must be >= 1, got {cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1 or null, got {cfg.max_steps}")
    if cfg.grad_accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {cfg.grad_accum}")
    if cfg.grad_clip is not None and cfg.grad_clip < 0:
        raise ValueError(f"train.grad_clip must be >= 0 (0 or null: no clipping), got {cfg.grad_clip}")
    if cfg.finetune_schedule not in ("continue", "restart"):
        raise ValueError(f"unknown train.finetune_schedule {cfg.finetune_schedule!r}; choose continue or restart")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown train.precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise ValueError(f"train.ema_decay must be in (0, 1) or null, got {cfg.ema_decay}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise ValueError(f"train.warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")


def staged_cosine(boundary: int, total: int, warmup_fraction: float, second_stage_scale: float = 1.0):
    """LR factor per step: linear warm-up and cosine decay over ``[0, total)``, or, with a `boundary`,
    over ``[0, boundary)`` and again over ``[boundary, total)`` scaled by `second_stage_scale`."""
    stages = [(0, boundary, 1.0), (boundary, total, second_stage_scale)] if boundary else [(0, total, 1.0)]

    def factor(step: int) -> float:
        start, end, scale = next((stage for stage in stages if step < stage[1]), stages[-1])
        length = max(end - start, 1)
        warmup = int(warmup_fraction * length)
        local = step - start
        if local < warmup:
            return scale * local / max(warmup, 1)
        progress = min((local - warmup) / max(length - warmup, 1), 1.0)
        return scale * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def new_run_dir(config: RunConfig, label: str | None = None) -> Path:
    """`output_dir/name`, or `output_dir/<label>-<timestamp>` when no name is given (label: the data
    format where the config has one, else the application). Several processes share rank 0's."""
    label = label or getattr(getattr(config, "data", None), "format", None) or config.application
    name = config.name or f"{label}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output_dir) / distributed.broadcast_object(name)  # one name for every process
