"""Knowledge distillation: a smaller student learns from a trained teacher (or an ensemble of them).

``dualhead distill TEACHER_RUN [--teacher MORE_RUN ...] [student config] [key=value ...]`` trains the
student with the normal `Trainer` (Hinton et al., 2015). Per head, on that head's own questions:

    loss = (1 - alpha) * task loss on the labels + alpha * T^2 * KL(teacher_T || student_T)

where ``p_T = softmax(logits / T)``; an ensemble's ``teacher_T`` is the mean of its members' tempered
probabilities. The yes/no head learns on the binary questions, the open head on the others (those
whose answer is outside the vocabulary too: they have no label, but a teacher's distribution), and
the router, where both models have one, mixes its cross-entropy with the teacher's router the same way.

The teachers are frozen, so their probabilities are computed once per distinct (image, question) of
the training split, on un-augmented inputs, before training starts. Computing them on the fly for
each augmented view would run the teachers' full encoders at their own resolution on every step of
fine-tuning (several times the student's own step on a CPU), and buys little here: the
augmentations are chosen to keep every answer true (small crops and rotations, brightness, flips
only where the question does not mention a side), and most epochs train on cached encoder features,
where there is no augmentation at all. The cost is memory: one row of probabilities per distinct
training question (questions x answers floats; VQA-RAD: about 6 MB).

A distillation run is an ordinary run of the ``vqa_distill`` application (`DistillRunConfig`: the
VQA config plus a ``distill`` section), so checkpoints, ``--resume``, best-epoch selection, the final
evaluation, ``dualhead evaluate``, ``export`` and ``predict`` work on it unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dualhead.core.applications import Application
from dualhead.core.config import load_config
from dualhead.core.experiment import inference
from dualhead.core.runtime import autocast_context
from dualhead.vqa.config import VQARunConfig
from dualhead.vqa.data import AnswerVocab, ImageStore, VQARecord, VQASplits
from dualhead.vqa.data.answers import first_difference
from dualhead.vqa.data.batching import VQABatch
from dualhead.vqa.evaluate import resolve_checkpoint
from dualhead.vqa.experiment import VQAExperiment, eval_sampler, make_loader, plot_confusions
from dualhead.vqa.features import model_inputs
from dualhead.vqa.metrics import HeadProbabilities
from dualhead.vqa.model import ANSWERS_FILE, CONFIG_FILE, SINGLE_TASK, DualHeadOutput, DualHeadVQA

log = logging.getLogger(__name__)

APPLICATION_NAME = "vqa_distill"


@dataclass
class DistillConfig:
    """Where the teachers are and how much the student listens to them."""

    teachers: list[str] = field(default_factory=list)  # checkpoints or run directories (their best/)
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the distillation term; 0 trains on the labels alone


@dataclass
class DistillRunConfig(VQARunConfig):
    """A VQA run whose student also learns from its teachers' probabilities."""

    application: str = APPLICATION_NAME
    distill: DistillConfig = field(default_factory=DistillConfig)


def validate_distill_config(cfg: DistillConfig) -> None:
    """Options that cannot work fail before any work starts."""
    if not cfg.teachers:
        raise ValueError("distill.teachers is empty: name the teacher run(s) (dualhead distill TEACHER_RUN ...)")
    if not cfg.temperature > 0:
        raise ValueError(f"distill.temperature must be > 0, got {cfg.temperature}")
    if not 0 <= cfg.alpha <= 1:
        raise ValueError(f"distill.alpha must be in [0, 1], got {cfg.alpha}")


def distillation_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """KL(teacher_T || student_T), averaged over rows, where student_T = softmax(logits / T)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, teacher_probs.float(), reduction="batchmean")


def mix(task_loss: Tensor | None, kd: Tensor | None, alpha: float, temperature: float) -> Tensor | None:
    """(1 - alpha) * task loss + alpha * T^2 * KD, over the terms a batch has (None: neither)."""
    terms = []
    if task_loss is not None:
        terms.append((1 - alpha) * task_loss)
    if kd is not None:
        terms.append(alpha * temperature**2 * kd)
    return sum(terms) if terms else None


def tempered(output: DualHeadOutput, temperature: float) -> HeadProbabilities:
    """softmax(logits / T) of every head, in float32 on the CPU."""

    def softmax(logits: Tensor | None) -> Tensor | None:
        return None if logits is None else (logits.float() / temperature).softmax(-1).cpu()

    return HeadProbabilities(binary=softmax(output.binary_logits), open=softmax(output.open_logits),
                             router=softmax(output.router_logits))


def select_rows(probs: HeadProbabilities, rows: Tensor) -> HeadProbabilities:
    """The rows `rows` of every head's probabilities."""

    def take(values: Tensor | None) -> Tensor | None:
        return None if values is None else values[rows.to(values.device)]

    return HeadProbabilities(binary=take(probs.binary), open=take(probs.open), router=take(probs.router))


@dataclass
class TeacherTargets:
    """The teachers' tempered probabilities per distinct (image, question)."""

    rows: dict[tuple[Path, str], int]
    probs: HeadProbabilities

    def for_batch(self, records: Sequence[VQARecord], device: torch.device) -> HeadProbabilities:
        """One row per record of a batch, on `device`."""
        try:
            index = torch.tensor([self.rows[(r.image, r.question)] for r in records])
        except KeyError as err:
            raise ValueError(f"no teacher probabilities for {err.args[0]}: it is not in the training split") from None
        selected = select_rows(self.probs, index)
        return HeadProbabilities(*(None if p is None else p.to(device) for p in (selected.binary, selected.open, selected.router)))


@torch.no_grad()
def teacher_targets(
    checkpoints: Sequence[Path],
    records: Sequence[VQARecord],
    temperature: float,
    device: torch.device,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
) -> TeacherTargets:
    """Each teacher's tempered probabilities for every distinct (image, question) of `records`,
    averaged over the teachers; each teacher reads its inputs at its own resolution."""
    first: dict[tuple[Path, str], VQARecord] = {}
    for record in records:
        first.setdefault((record.image, record.question), record)
    rows = {key: row for row, key in enumerate(first)}
    distinct = list(first.values())
    members = []
    for checkpoint in checkpoints:
        model = DualHeadVQA.from_pretrained(checkpoint).to(device)
        loader = make_loader(model, distinct, eval_sampler(distinct), ImageStore(model.preprocessor), num_workers=num_workers)

        def step(batch: VQABatch, model: DualHeadVQA = model) -> tuple[list[VQARecord], HeadProbabilities]:
            batch = batch.to(device)
            with autocast_context(device, precision):
                return batch.records, tempered(model(**model_inputs(batch)), temperature)

        order, parts = [], []
        for batch_records, probs in inference(model, loader, step, progress):
            order += [rows[(r.image, r.question)] for r in batch_records]
            parts.append(probs)
        members.append(select_rows(HeadProbabilities.concat(parts), torch.argsort(torch.tensor(order))))
        del model
    try:
        return TeacherTargets(rows, HeadProbabilities.average(members))
    except ValueError as err:
        raise ValueError(f"the teachers {', '.join(map(str, checkpoints))} cannot be averaged: {err}") from None


def check_teacher(checkpoint: Path, vocab: AnswerVocab, single_head: bool) -> dict:
    """The teacher's model configuration, after checking that its answers are the student's, in the
    same order, and that it has the student's heads; a clear error otherwise."""
    try:
        model_config = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))["model"]
        teacher = AnswerVocab.from_json(json.loads((checkpoint / ANSWERS_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the teacher checkpoint {checkpoint}: {err}") from None
    theirs, ours = teacher.open_answers, vocab.open_answers
    if theirs != ours:
        position, teacher_answer, student_answer = first_difference(theirs, ours)
        raise ValueError(
            f"the student's answer vocabulary differs from the teacher's ({checkpoint / ANSWERS_FILE}): at position "
            f"{position} the teacher has {teacher_answer}, the student's data gives {student_answer} ({len(theirs)} vs {len(ours)} "
            "open answers); distil on the teacher's dataset and data options (data.format, root, min_answer_count, max_answers)"
        )
    if bool(model_config.get("single_head")) != single_head:
        kinds = {True: "single-head", False: "dual-head"}
        raise ValueError(f"the teacher {checkpoint} is a {kinds[bool(model_config.get('single_head'))]} model and the "
                         f"student a {kinds[single_head]} one: their heads must match (model.single_head)")
    return model_config


def warn_if_split_differs(checkpoint: Path, config: VQARunConfig) -> None:
    """The student's validation questions should be ones the teacher never trained on: same data,
    same seed carving the validation split. Warn otherwise (an ensemble of seeds, say): the teacher's
    knowledge of them would flatter the student's validation scores."""
    run_config = checkpoint.parent / "config.yaml"
    if not run_config.is_file():
        return
    teacher = load_config(run_config)
    fields_ = ("format", "root", "lang", "val_fraction", "tasks", "skip_invalid")
    differs = [f"data.{name}" for name in fields_ if getattr(teacher.data, name) != getattr(config.data, name)]
    differs += ["train.seed"] if teacher.train.seed != config.train.seed else []
    if differs:
        log.warning("the student's %s differ from the teacher %s's: its validation split may hold questions the "
                    "teacher trained on", ", ".join(differs), checkpoint)


class DistillationExperiment(VQAExperiment):
    """The VQA experiment with the teachers' probabilities added to each head's (and the router's) loss."""

    def __init__(self, config: DistillRunConfig, splits: VQASplits | None = None):
        validate_distill_config(config.distill)
        super().__init__(config, splits)
        self.teacher_checkpoints = [resolve_checkpoint(path) for path in config.distill.teachers]
        configs = [check_teacher(checkpoint, self.vocab, config.model.single_head) for checkpoint in self.teacher_checkpoints]
        # The router learns from the teachers only where every one of them has a router.
        self.distil_router = config.model.router and all(c.get("router", True) for c in configs)
        for checkpoint in self.teacher_checkpoints:
            warn_if_split_differs(checkpoint, config)
        self._targets: TeacherTargets | None = None

    def teacher_probabilities(self) -> TeacherTargets:
        """The teachers' probabilities for the training split (computed on first use)."""
        if self._targets is None:
            started = time.perf_counter()
            cfg = self.config
            # Building a teacher draws random initial weights: the student's random stream must not move.
            with torch.random.fork_rng(devices=[]):
                self._targets = teacher_targets(
                    self.teacher_checkpoints, self.splits.train, cfg.distill.temperature, self.device,
                    cfg.train.precision, cfg.data.num_workers, cfg.train.progress,
                )
            log.info("teacher probabilities for %d distinct training questions from %d teacher(s) in %.1f s",
                     len(self._targets.rows), len(self.teacher_checkpoints), time.perf_counter() - started)
        return self._targets

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.config.distill.alpha > 0:
            self.teacher_probabilities()  # before the first step, not inside it

    def task_losses(self, output: DualHeadOutput, batch: VQABatch) -> dict[str, Tensor]:
        losses = super().task_losses(output, batch)
        alpha, temperature = self.config.distill.alpha, self.config.distill.temperature
        if alpha == 0:
            return losses
        teacher = self.teacher_probabilities().for_batch(batch.records, output.open_logits.device)
        if output.binary_logits is None:
            heads = [(SINGLE_TASK, output.open_logits, teacher.open, torch.ones_like(batch.is_binary))]
        else:
            heads = [("binary", output.binary_logits, teacher.binary, batch.is_binary),
                     ("open", output.open_logits, teacher.open, ~batch.is_binary)]
        for name, logits, probs, rows in heads:
            if name not in self.tasks or not rows.any():
                continue
            kd = distillation_loss(logits[rows], probs[rows], temperature)
            losses[name] = mix(losses.get(name), kd, alpha, temperature)
        return losses

    def auxiliary_loss(self, output: DualHeadOutput, batch: VQABatch) -> Tensor | None:
        router = super().auxiliary_loss(output, batch)  # router_weight * cross-entropy
        alpha, temperature = self.config.distill.alpha, self.config.distill.temperature
        if router is None or alpha == 0 or not self.distil_router:
            return router
        teacher = self.teacher_probabilities().for_batch(batch.records, output.router_logits.device)
        kd = distillation_loss(output.router_logits, teacher.router, temperature) * self.config.train.router_weight
        return mix(router, kd, alpha, temperature)


def distillation_config(teachers: Sequence[str | Path], student_config: str | Path | None = None,
                        overrides: Sequence[str] = ()) -> DistillRunConfig:
    """The student's run config: `student_config` (a YAML or a bundled name; default: the first teacher
    run's own config.yaml, under a new run name) with `overrides`, distilling from `teachers`."""
    if not teachers:
        raise ValueError("name at least one teacher run")
    checkpoints = [resolve_checkpoint(path) for path in teachers]
    if student_config is None:
        student_config = checkpoints[0].parent / "config.yaml"
        if not student_config.is_file():
            raise ValueError(f"{teachers[0]} is a checkpoint outside a run directory: name the student's config "
                             "(e.g. vqa_rad_student)")
        overrides = ["name=null", *overrides]  # not the teacher's run directory
    config = load_config(student_config, [*overrides, f"application={APPLICATION_NAME}"])
    config.distill.teachers = [str(checkpoint.resolve()) for checkpoint in checkpoints]
    validate_distill_config(config.distill)
    return config


APPLICATION = Application(
    name=APPLICATION_NAME,
    config_class=DistillRunConfig,
    build_experiment=DistillationExperiment,
    description="Dual-Head VQA student distilled from trained teacher runs (dualhead distill)",
    plot_results=plot_confusions,
)
