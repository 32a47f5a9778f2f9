"""The training loop: data -> model -> per-task losses -> balancer -> optimiser, with checkpoints.

A run directory holds `config.yaml` (what the run used), `metrics.jsonl` and TensorBoard events,
`best/` and `last/` checkpoints, plots, and the final `test_metrics.json` / `results.md`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from dualhead.config import REFERENCE_TASK_WEIGHTS, RunConfig, load_config, save_config
from dualhead.mtl.balancers import build_balancer
from dualhead.mtl.diagnostics import gradient_conflict
from dualhead.train.checkpoints import (
    load_trainer_state,
    recover_interrupted,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dualhead.train.features import EncoderFeatureCache, model_inputs
from dualhead.train.plots import plot_run
from dualhead.vqa.data import AnswerVocab, ImageStore, VQARecord, VQASplits, load_splits
from dualhead.vqa.data.batching import GroupedBatchSampler, VQACollator
from dualhead.vqa.encoders import freeze_module, is_frozen, unfreeze_module
from dualhead.vqa.metrics import HeadProbabilities, binary_confusion, format_metrics_table, score
from dualhead.vqa.model import DualHeadVQA
from dualhead.vqa.objective import VQAObjective, all_finite

log = logging.getLogger(__name__)

VALIDATION_METRICS = ("accuracy", "binary_accuracy", "open_accuracy", "oracle_accuracy", "router_accuracy", "vqa_accuracy")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return device


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CPU and CUDA, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise ValueError(f"unknown train.precision {precision!r}; choose bf16 or fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Prediction:
    """A split's records in evaluation order, with head probabilities."""

    records: list[VQARecord]
    probs: HeadProbabilities


class Trainer:
    """Trains a DualHeadVQA model as `config` says, writing everything into `run_dir`."""

    def __init__(self, config: RunConfig, run_dir: Path, splits: VQASplits | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        train_cfg = config.train
        seed_everything(train_cfg.seed)
        if train_cfg.metric not in VALIDATION_METRICS:
            raise ValueError(f"unknown train.metric {train_cfg.metric!r}; choose one of {', '.join(VALIDATION_METRICS)}")
        self.device = resolve_device(train_cfg.device)
        self.splits = splits if splits is not None else load_splits(config.data, seed=train_cfg.seed)
        if not self.splits.train:
            raise ValueError(f"the {config.data.format} training split is empty")
        self.vocab = AnswerVocab.from_records(self.splits.train, config.data.min_answer_count, config.data.max_answers)
        self.model = DualHeadVQA(config.model, self.vocab).to(self.device)
        self.soft_targets = any(r.answer_scores for r in self.splits.train)
        self.objective = VQAObjective(train_cfg, self.vocab, self.splits.train, config.model.single_head, self.soft_targets).to(self.device)
        self.balancer = build_balancer(train_cfg.balancer, self.objective.tasks, **self._balancer_options()).to(self.device)
        self.store = ImageStore(self.model.preprocessor, cache=config.data.cache_images)
        self.optimizer = self._build_optimizer()  # before any warm-up freezing: it holds every trainable parameter
        self.train_sampler = GroupedBatchSampler(
            self.splits.train, config.data.batch_size, config.data.questions_per_image, shuffle=True, seed=train_cfg.seed
        )
        # Which encoders are frozen now; the feature cache and the loader follow (see `_enter_stage`).
        self.stage: tuple[bool, bool] | None = None
        self.cache: EncoderFeatureCache | None = None
        self.train_loader: DataLoader | None = None
        self.total_steps = train_cfg.max_steps or self._steps_in_epochs(train_cfg.epochs)
        self.scheduler = self._build_scheduler()
        self.state: dict[str, Any] = {"epoch": 0, "batches_done": 0, "step": 0, "best": None, "bad_epochs": 0, "stopped": False}
        self.writer: SummaryWriter | None = None

    # -- construction -----------------------------------------------------------------------------

    def _balancer_options(self) -> dict[str, Any]:
        if self.config.train.balancer == "fixed":
            schedule = self.config.train.task_weight_schedule or REFERENCE_TASK_WEIGHTS
            if self.config.model.single_head:  # one task: the schedule's tasks do not apply
                schedule = None
            return {"schedule": schedule}
        return dict(self.config.train.balancer_options)

    def _build_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warm-up then cosine decay, once over the run or (`finetune_schedule=restart`)
        once per stage: frozen warm-up, then fine-tuning."""
        cfg = self.config.train
        if cfg.finetune_schedule not in ("continue", "restart"):
            raise ValueError(f"unknown train.finetune_schedule {cfg.finetune_schedule!r}; choose continue or restart")
        boundary = 0
        if cfg.finetune_schedule == "restart" and 0 < cfg.frozen_warmup_epochs < cfg.epochs and cfg.max_steps is None:
            boundary = self._steps_in_epochs(cfg.frozen_warmup_epochs)
        finetune_scale = (cfg.finetune_lr / cfg.lr) if cfg.finetune_lr is not None else 1.0
        lambdas = []
        for group in self.optimizer.param_groups:
            scale = finetune_scale if group.get("role") == "new" else 1.0
            lambdas.append(staged_cosine(boundary, max(self.total_steps, 1), cfg.warmup_fraction, scale))
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)

    def _steps_in_epochs(self, epochs: int) -> int:
        """Optimiser steps in the first `epochs` epochs (the schedule's length)."""
        steps = 0
        for epoch in range(epochs):
            self.train_sampler.set_epoch(epoch)
            steps += math.ceil(self.train_sampler.epoch_length / self.config.train.grad_accum)
        self.train_sampler.set_epoch(0)
        return steps

    def _enter_stage(self, epoch: int) -> None:
        """Freeze the encoders the config (or the frozen warm-up) freezes at `epoch`; cache their
        features and rebuild the training loader when that changes."""
        warm_up = epoch < self.config.train.frozen_warmup_epochs
        stage = (self.config.model.vision.freeze or warm_up, self.config.model.text.freeze or warm_up)
        if stage == self.stage:
            return
        for module, frozen in zip((self.model.vision, self.model.text), stage, strict=True):
            if frozen and not is_frozen(module):
                freeze_module(module)
            elif not frozen and is_frozen(module):
                unfreeze_module(module)
        self.stage = stage
        self.cache = None
        if self.config.train.cache_frozen_features and any(stage):
            records = self.splits.train + self.splits.val + self.splits.test
            self.cache = EncoderFeatureCache.build(
                self.model, records, self.store, self.device, self._autocast(), images=stage[0], texts=stage[1],
                progress=self.config.train.progress,
            )
        self.train_loader = self._loader(self.splits.train, self.train_sampler, augment=self.config.data.augment)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; pretrained encoders at `encoder_lr`, new layers at `lr`; no decay on biases and norms."""
        cfg = self.config.train
        groups: dict[tuple[str, float], list[torch.nn.Parameter]] = {}
        encoders = {id(p) for module in (self.model.vision, self.model.text) for p in module.parameters()}
        for param in self.model.parameters():
            if not param.requires_grad:
                continue
            role = "encoder" if id(param) in encoders else "new"
            decay = cfg.weight_decay if param.ndim > 1 else 0.0
            groups.setdefault((role, decay), []).append(param)
        lrs = {"encoder": cfg.encoder_lr, "new": cfg.lr}
        param_groups = [{"params": params, "lr": lrs[role], "weight_decay": decay, "role": role} for (role, decay), params in groups.items()]
        balancer_params = [p for p in self.balancer.parameters() if p.requires_grad]
        if balancer_params:
            param_groups.append({"params": balancer_params, "lr": self.balancer.lr, "weight_decay": 0.0, "role": "balancer"})
        # The fused kernel is far faster than the default for-each kernel on CPU (a large share of a step).
        return torch.optim.AdamW(param_groups, fused=self.device.type in ("cpu", "cuda"))

    def _loader(self, records: list[VQARecord], sampler: GroupedBatchSampler, augment: bool = False) -> DataLoader:
        return make_loader(self.model, records, sampler, self.store, self.cache, self.config.data.num_workers, augment, self.soft_targets)

    def _autocast(self):
        return autocast_context(self.device, self.config.train.precision)

    # -- resume -----------------------------------------------------------------------------------

    @classmethod
    def resume(cls, run_dir: Path) -> Trainer:
        """Continue a stopped run from its `last/` checkpoint: weights, optimiser, scheduler, RNG, counters."""
        run_dir = Path(run_dir)
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"cannot resume: {config_path} not found; is {run_dir} a dualhead run directory?")
        for name in ("last", "best"):
            recover_interrupted(run_dir / name)
        trainer = cls(load_config(config_path), run_dir)
        state = load_trainer_state(run_dir / "last")
        trainer.model.load_weights(run_dir / "last", trainer.device)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.balancer.load_state_dict(state["balancer"])
        trainer.state = state["progress"]
        set_rng_state(state["rng"])
        return trainer

    def _save(self, name: str) -> None:
        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "progress": dict(self.state),
            "rng": rng_state(),
        }
        save_checkpoint(self.run_dir / name, self.model, trainer_state)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train until the epoch budget, `max_steps` or early stopping; then test the best checkpoint."""
        save_config(self.config, self.run_dir / "config.yaml")
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        log.info("run directory: %s", self.run_dir)
        try:
            while not self._finished():
                self._enter_stage(self.state["epoch"])
                epoch_metrics = self._train_epoch(self.state["epoch"])
                if epoch_metrics is None:  # max_steps reached mid-epoch
                    break
        finally:
            self.writer.close()
        return self._finish()

    def _finished(self) -> bool:
        cfg = self.config.train
        return (
            self.state["stopped"]
            or self.state["epoch"] >= cfg.epochs
            or (cfg.max_steps is not None and self.state["step"] >= cfg.max_steps)
        )

    def _train_epoch(self, epoch: int) -> dict[str, Any] | None:
        cfg = self.config.train
        self.model.train()
        self.balancer.set_epoch(epoch)
        skip = self.state["batches_done"]  # resuming mid-epoch: the epoch's order is reproducible
        self.train_sampler.set_epoch(epoch, skip=skip)
        self.train_loader.generator.manual_seed(cfg.seed * 1_000_003 + epoch)  # worker seeds, per epoch
        epoch_length = self.train_sampler.epoch_length
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        started = time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for index, batch in enumerate(bar, start=skip):
            losses, report, diagnostics = self._train_batch(batch, epoch, index)
            if diagnostics:
                self._log("diagnostics", diagnostics)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
            self.state["batches_done"] = index + 1
            if (index + 1) % cfg.grad_accum == 0 or index + 1 == epoch_length:
                self._optimizer_step()
                bar.set_postfix(loss=f"{report.loss:.3f}")
                if cfg.log_every_steps and self.state["step"] % cfg.log_every_steps == 0:
                    self._log("step", {**{f"loss/{k}": v for k, v in losses.items()}, **{f"weight/{k}": v for k, v in report.weights.items()},
                                       "lr": self.scheduler.get_last_lr()[0]})
                if cfg.checkpoint_every_steps and self.state["step"] % cfg.checkpoint_every_steps == 0:
                    self._save("last")
                if cfg.max_steps is not None and self.state["step"] >= cfg.max_steps:
                    break
        epoch_done = self.state["batches_done"] >= epoch_length
        metrics = {f"train/loss/{k}": totals[k] / counts[k] for k in totals}
        metrics["train/seconds"] = time.perf_counter() - started
        if epoch_done or (cfg.max_steps is not None and self.state["step"] >= cfg.max_steps):
            metrics.update(self._validate(epoch))
            if epoch_done:
                self.state["epoch"] = epoch + 1
                self.state["batches_done"] = 0
            self._log("epoch", metrics)
            self._save("last")
        return metrics if epoch_done else None

    def _train_batch(self, batch, epoch: int, index: int):
        cfg = self.config.train
        batch = batch.to(self.device)
        with self._autocast():
            output = self.model(**model_inputs(batch, self.cache))
            task_losses, router_loss = self.objective(output, batch)
        if not all_finite(task_losses) or (router_loss is not None and not torch.isfinite(router_loss)):
            values = {k: float(v.detach()) for k, v in task_losses.items()}
            raise TrainingDiverged(
                f"non-finite loss at epoch {epoch + 1}, batch {index + 1} (step {self.state['step']}): {values}, router "
                f"{None if router_loss is None else float(router_loss.detach())}; the last good checkpoint is {self.run_dir / 'last'}"
            )
        diagnostics = {}
        every = cfg.diagnostics_every_steps
        if every and len(task_losses) > 1 and self.state["step"] % every == 0 and index % cfg.grad_accum == 0:
            diagnostics = gradient_conflict(task_losses, output.fused)
        scale = 1.0 / cfg.grad_accum
        extra = router_loss * cfg.router_weight * scale if router_loss is not None else None
        report = self.balancer.backward(
            {task: loss * scale for task, loss in task_losses.items()},
            shared_params=self._shared_params(),
            shared_features=output.fused,
            extra_loss=extra,
            epoch=epoch,
            step=self.state["step"],
        )
        logged = {task: float(loss.detach()) for task, loss in task_losses.items()}
        if router_loss is not None:
            logged["router"] = float(router_loss.detach())
        return logged, report, diagnostics

    def _shared_params(self) -> list[torch.nn.Parameter]:
        shared = [self.model.vision, self.model.text, self.model.fusion]
        return [p for module in shared for p in module.parameters() if p.requires_grad]

    def _optimizer_step(self) -> None:
        clip = self.config.train.grad_clip
        if clip:  # the model's gradients only: a balancer's own parameters follow their own rule
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state["step"] += 1

    # -- evaluation -------------------------------------------------------------------------------

    def predict(self, records: list[VQARecord]) -> Prediction:
        """Head probabilities for `records` (in grouped order) with the current weights."""
        self._enter_stage(self.state["epoch"])
        loader = self._loader(records, eval_sampler(records, max(self.config.data.batch_size, 128)))
        return predict_probabilities(self.model, loader, self.cache, self.device, self._autocast(), self.config.train.progress)

    def _validate(self, epoch: int) -> dict[str, Any]:
        if not self.splits.val:
            return {}
        prediction = self.predict(self.splits.val)
        metrics, _ = score(prediction.probs, prediction.records, self.vocab)
        value = metrics.get(self.config.train.metric)
        if value is not None and (self.state["best"] is None or value > self.state["best"]):
            self.state["best"] = value
            self.state["bad_epochs"] = 0
            self._save("best")
        elif epoch >= self.config.train.frozen_warmup_epochs:  # the warm-up's plateau does not count
            self.state["bad_epochs"] += 1
            patience = self.config.train.early_stopping_patience
            if patience is not None and self.state["bad_epochs"] >= patience:
                log.info("early stopping after epoch %d: no better val %s for %d epochs", epoch + 1, self.config.train.metric, patience)
                self.state["stopped"] = True
        return {f"val/{k}": v for k, v in metrics.items()}

    def _finish(self) -> dict[str, Any]:
        """Evaluate the best checkpoint (or the last, without validation data) on val and test; plot."""
        chosen = self.run_dir / ("best" if (self.run_dir / "best").exists() else "last")
        if not chosen.exists():
            self._save("last")
        self.model.load_weights(chosen, self.device)
        results: dict[str, Any] = {"checkpoint": str(chosen)}
        tables = []
        for split in ("val", "test"):
            records = self.splits.split(split)
            if not records:
                continue
            prediction = self.predict(records)
            metrics, _ = score(prediction.probs, prediction.records, self.vocab)
            metrics["binary_confusion"] = binary_confusion(prediction.probs, prediction.records)
            results[split] = metrics
            tables.append(format_metrics_table({k: v for k, v in metrics.items() if k != "binary_confusion"}, f"{split} ({chosen.name})"))
        (self.run_dir / "test_metrics.json").write_text(json.dumps(results, indent=2))
        (self.run_dir / "results.md").write_text("\n\n".join(tables) + "\n")
        plot_run(self.run_dir)
        return results

    def _log(self, kind: str, metrics: dict[str, Any]) -> None:
        row = {"kind": kind, "epoch": self.state["epoch"], "step": self.state["step"], "time": datetime.now().isoformat(timespec="seconds"), **metrics}
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and value is not None:
                    self.writer.add_scalar(key if kind == "epoch" else f"step/{key}", value, self.state["step"])


@torch.no_grad()
def predict_probabilities(model: DualHeadVQA, loader: DataLoader, cache, device, autocast, progress: bool = False) -> Prediction:
    """Run the model over a loader; probabilities per head, with the records in loader order."""
    was_training = model.training
    model.eval()
    ordered: list[VQARecord] = []
    parts = []
    try:
        for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
            batch = batch.to(device)
            with autocast:
                output = model(**model_inputs(batch, cache))
            ordered += batch.records
            parts.append(HeadProbabilities.from_output(output))
    finally:
        model.train(was_training)
    return Prediction(ordered, HeadProbabilities.concat(parts))


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


def make_loader(
    model: DualHeadVQA,
    records: list[VQARecord],
    sampler: GroupedBatchSampler,
    store: ImageStore,
    cache: EncoderFeatureCache | None = None,
    num_workers: int = 0,
    augment: bool = False,
    soft_targets: bool = False,
) -> DataLoader:
    """A DataLoader of grouped `VQABatch`es for `model`, loading only inputs the cache lacks."""
    collator = VQACollator(
        model.vocab,
        store,
        model.text.tokenize,
        augment=augment,
        soft_targets=soft_targets,
        load_images=not (cache and cache.has_images),
        load_text=not (cache and cache.has_text),
    )
    # A generator of its own: iterating must not draw from the global RNG, or a run resumed
    # mid-epoch would see different dropout masks than an uninterrupted one.
    return DataLoader(
        records, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(sampler.seed),
    )


def eval_sampler(records: list[VQARecord], batch_size: int = 128, questions_per_image: int = 16) -> GroupedBatchSampler:
    """Deterministic grouped batches for evaluation (many questions per image: no gradients to balance)."""
    return GroupedBatchSampler(records, batch_size, questions_per_image, shuffle=False)


def new_run_dir(config: RunConfig) -> Path:
    """`output_dir/name`, or `output_dir/<format>-<timestamp>` when no name is given."""
    name = config.name or f"{config.data.format}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output_dir) / name
