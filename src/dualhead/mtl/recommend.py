"""Choose a multi-task architecture from measurements: ``dualhead recommend``.

A short probe run trains the hard-sharing model of the user's config on their data and, before each
step, measures how the tasks relate where they share:

- the gradient cosine between every pair of tasks at the model's conflict parameters
  (`dualhead.mtl.diagnostics.gradient_conflict`): its mean, and the fraction of steps where it is
  negative (the steps a gradient-surgery method such as PCGrad would act on);
- the ratio of the largest to the smallest task gradient norm there (median over steps);
- the inter-task affinity of Fifty et al. (NeurIPS 2021, "Efficiently identifying task groupings"):
  ``Z(i -> j) = 1 - L_j(theta_s - lr * grad_s L_i) / L_j(theta_s)``, the relative change of task j's
  loss on the same batch after a lookahead SGD step on task i alone at the shared parameters (> 0: a
  step on i helps j; < 0: it hurts j).

The probe runs in float32 whatever the config's precision: the lookahead changes a loss by a small
relative amount, which bf16's 8-bit mantissa would drown. Forward passes of one step share one
random seed, so dropout masks are the same before and after the lookahead, and batch-norm buffers
are restored after each lookahead.

`decide` applies the decision tree of the seed document (``mtl_architecture_patterns.md``) to those
numbers, in this order, with these thresholds:

1. compute is limited (the user says so) -> hard sharing.
2. the tasks' outputs differ in structure (their predictions' shapes beyond batch and channels have
   different ranks, e.g. per-pixel maps vs a set of boxes) -> multi-decoder.
3. the tasks conflict -> soft sharing: some pair's gradient cosine is negative in at least
   ``CONFLICT_NEGATIVE_FRACTION`` = 0.5 of the steps (a majority of the updates pull the shared
   parameters apart, so PCGrad would project most steps), or a step on either task raises the other's
   loss on average in both directions (mutual negative affinity).
4. the tasks are similar -> hard sharing: every pair's mean cosine is at least ``SIMILAR_COSINE`` =
   0.2 and every affinity is positive. Independent gradients in millions of dimensions have a cosine
   of about 0; 0.2 (78 degrees) means a step on one task makes first-order progress on the other at
   a fifth of its own rate, consistently enough to share everything.
5. otherwise the tasks are loosely related -> adapters or routing (task-specific capacity on a
   shared backbone, without the cost of separate columns).

A median gradient-norm ratio of ``DOMINANCE_NORM_RATIO`` = 10 or more adds advice to balance the
losses: one task then sets the shared parameters' direction whatever the architecture.

`measure_costs` builds each candidate architecture on the same config and times its training steps
(a warm-up step, then the median of a few), with its parameter count. The application supplies the
candidates (`architecture_candidates` makes them for configs with a ``model.architecture`` option).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dualhead.core.runtime import derived_seed
from dualhead.core.trainer import Trainer
from dualhead.mtl.diagnostics import COSINE_PREFIX, NORM_PREFIX, gradient_conflict

SIMILAR_COSINE = 0.2
CONFLICT_NEGATIVE_FRACTION = 0.5
DOMINANCE_NORM_RATIO = 10.0

HARD_SHARING = "hard sharing"
MULTI_DECODER = "multi-decoder"
ADAPTERS_OR_ROUTING = "adapters or routing"
SOFT_SHARING = "soft sharing"
UNCLASSIFIED = "unclassified"

#: The decision tree's families that each architecture of `dualhead.mtl.architectures` implements.
ARCHITECTURE_FAMILIES: dict[str, tuple[str, ...]] = {
    "hard_fpn": (HARD_SHARING,),
    "multitask_fpn": (HARD_SHARING,),
    "mtan": (SOFT_SHARING,),
    "cross_stitch": (SOFT_SHARING,),
    "sluice": (SOFT_SHARING,),
    "moe": (ADAPTERS_OR_ROUTING, SOFT_SHARING),
    "hypernet": (ADAPTERS_OR_ROUTING,),
    "adapters": (ADAPTERS_OR_ROUTING, SOFT_SHARING),
    "lora": (ADAPTERS_OR_ROUTING, SOFT_SHARING),
    "adapters_shared_head": (ADAPTERS_OR_ROUTING, SOFT_SHARING),
    "task_queries": (MULTI_DECODER,),
    "multi_decoder": (MULTI_DECODER,),
}


@dataclass
class Candidate:
    """An architecture to weigh: its run config, or None with a `note` saying why it does not apply."""

    name: str
    config: Any | None
    families: tuple[str, ...]
    note: str = ""
    reference: bool = False  # the hard-sharing model the probe trains: step times are ratios to its


def architecture_candidates(config: Any, architectures: Sequence[str], hard_sharing: str) -> tuple[Any, list[Candidate]]:
    """(probe config, candidates) for `config`: where its model has an ``architecture`` option, the
    probe is `hard_sharing` and each of `architectures` is a candidate on the same config; otherwise
    the configured model (a hard-sharing model) is the probe and only candidate, and every named
    architecture is listed as not applying."""
    model = getattr(config, "model", None)
    if model is not None and hasattr(model, "architecture"):
        if hard_sharing not in architectures:
            raise ValueError(f"the hard-sharing architecture {hard_sharing!r} is not among {list(architectures)}")

        def with_architecture(name: str) -> Any:
            changed = copy.deepcopy(config)
            changed.model.architecture = name
            return changed

        candidates = [
            Candidate(
                name, with_architecture(name), ARCHITECTURE_FAMILIES.get(name, (UNCLASSIFIED,)), reference=name == hard_sharing
            )
            for name in architectures
        ]
        return with_architecture(hard_sharing), candidates
    application = getattr(config, "application", "this")
    candidates = [Candidate(f"{application} (as configured)", config, (HARD_SHARING,), "the configured model", True)]
    candidates += [
        Candidate(
            name,
            None,
            ARCHITECTURE_FAMILIES.get(name, (UNCLASSIFIED,)),
            f"does not apply: the {application} model has no model.architecture option",
        )
        for name in architectures
    ]
    return config, candidates


# -- the probe ------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """Per-step measurements of the probe run and their summaries (see the module docstring)."""

    steps: int  # training steps run
    measured_steps: int  # steps whose batch held at least two tasks' labels
    lookahead_lr: float
    cosines: dict[str, list[float]] = field(default_factory=dict)  # "a~b" -> per step
    norms: dict[str, list[float]] = field(default_factory=dict)  # task -> per step
    affinity: dict[str, list[float]] = field(default_factory=dict)  # "i->j" -> per step
    structures: dict[str, list[int]] = field(default_factory=dict)  # task -> prediction shape beyond [B, C]

    def cosine_mean(self) -> dict[str, float]:
        return {pair: statistics.fmean(values) for pair, values in self.cosines.items() if values}

    def negative_fraction(self) -> dict[str, float]:
        return {pair: sum(v < 0 for v in values) / len(values) for pair, values in self.cosines.items() if values}

    def affinity_mean(self) -> dict[str, float]:
        return {pair: statistics.fmean(values) for pair, values in self.affinity.items() if values}

    def norm_ratio(self) -> float:
        """Median over steps of the largest task gradient norm over the smallest."""
        tasks = list(self.norms)
        ratios = []
        for step in range(min(len(values) for values in self.norms.values())):
            norms = [self.norms[task][step] for task in tasks]
            ratios.append(max(norms) / max(min(norms), 1e-30))
        return statistics.median(ratios)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "measured_steps": self.measured_steps,
            "lookahead_lr": self.lookahead_lr,
            "cosine_mean": self.cosine_mean(),
            "cosine_negative_fraction": self.negative_fraction(),
            "grad_norm_ratio": self.norm_ratio(),
            "grad_norm_median": {task: statistics.median(values) for task, values in self.norms.items()},
            "affinity_mean": self.affinity_mean(),
            "structures": self.structures,
        }


def lookahead_affinity(
    trainer: Trainer, batch: Any, losses: Mapping[str, Tensor], seed: int, lr: float
) -> dict[str, float]:
    """``{"i->j": Z}`` for every ordered pair of tasks in `losses` (computed on `batch` under `seed`),
    with a lookahead SGD step of rate `lr` on each task alone at the shared parameters."""
    model = trainer.model
    params = model.shared_parameters()
    grads = {
        task: torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for task, loss in losses.items()
    }
    before = {task: float(loss.detach()) for task, loss in losses.items()}
    originals = [p.detach().clone() for p in params]
    buffers = [b.detach().clone() for b in model.buffers()]
    result = {}
    with torch.no_grad():
        for i in losses:
            for p, g in zip(params, grads[i], strict=True):
                if g is not None:
                    p.sub_(lr * g)
            after = task_losses_under_seed(trainer, batch, seed)
            for p, original in zip(params, originals, strict=True):
                p.copy_(original)
            for b, original in zip(model.buffers(), buffers, strict=True):
                b.copy_(original)
            for j in losses:
                if j != i and j in after:
                    result[f"{i}->{j}"] = 1.0 - float(after[j]) / max(before[j], 1e-30)
    return result


def task_losses_under_seed(trainer: Trainer, batch: Any, seed: int) -> dict[str, Tensor]:
    """The experiment's forward and task losses on `batch`, random draws (dropout) seeded by `seed`."""
    experiment = trainer.experiment
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with experiment.autocast():
            output = experiment.forward(batch)
            return experiment.task_losses(output, batch)


def probe(trainer: Trainer, steps: int, lookahead_lr: float | None = None) -> ProbeResult:
    """Train `trainer`'s model for `steps` steps of its own loop, measuring before each step the
    gradient cosines, norms and affinities of the tasks present in the batch (see the module docstring)."""
    if steps < 1:
        raise ValueError(f"the probe needs at least one step, got {steps}")
    experiment, model = trainer.experiment, trainer.model
    if len(experiment.task_names) < 2:
        raise ValueError(f"recommending a multi-task architecture needs two tasks or more, got {experiment.task_names}")
    lr = trainer.config.train.lr if lookahead_lr is None else lookahead_lr
    if not lr > 0:
        raise ValueError(f"the lookahead learning rate must be > 0, got {lr}")
    result = ProbeResult(steps=0, measured_steps=0, lookahead_lr=lr)
    model.train()
    experiment.on_epoch_start(0)
    epoch = 0
    while result.steps < steps:
        trainer.sampler.set_epoch(epoch)
        for raw in experiment.train_loader():
            batch = experiment.to_device(raw)
            seed = derived_seed(trainer.config.train.seed, epoch, result.steps)
            losses = task_losses_under_seed(trainer, batch, seed)
            if len(losses) >= 2:
                record_measurements(result, trainer, batch, losses, seed, lr)
            del losses
            trainer.train_step(batch)
            result.steps += 1
            if result.steps >= steps:
                break
        epoch += 1
    if not result.measured_steps:
        raise ValueError(f"no batch of the {steps} probe steps held two tasks' labels: nothing to compare")
    return result


def record_measurements(
    result: ProbeResult, trainer: Trainer, batch: Any, losses: dict[str, Tensor], seed: int, lr: float
) -> None:
    """Add one step's cosines, norms, affinities and output structures to `result`."""
    conflict = gradient_conflict(losses, trainer.model.conflict_parameters())
    for key, value in conflict.items():
        if key.startswith(COSINE_PREFIX):
            result.cosines.setdefault(key.removeprefix(COSINE_PREFIX), []).append(value)
        elif key.startswith(NORM_PREFIX):
            result.norms.setdefault(key.removeprefix(NORM_PREFIX), []).append(value)
    for pair, value in lookahead_affinity(trainer, batch, losses, seed, lr).items():
        result.affinity.setdefault(pair, []).append(value)
    if not result.structures:
        with torch.no_grad(), trainer.experiment.autocast():
            predictions = trainer.experiment.forward(batch).predictions
        result.structures = {task: list(prediction.shape[2:]) for task, prediction in predictions.items()}
    result.measured_steps += 1


# -- the decision ---------------------------------------------------------------------------------


@dataclass
class Decision:
    """The decision tree's answer: a family of architectures, and the numbers that led to it."""

    family: str
    branch: str  # which condition of the tree held
    reasons: list[str]
    advice: list[str] = field(default_factory=list)


def decide(summary: Mapping[str, Any], limited_compute: bool = False) -> Decision:
    """The seed's decision tree on a `ProbeResult.summary()` (order and thresholds: module docstring)."""
    cosine, negative = summary["cosine_mean"], summary["cosine_negative_fraction"]
    affinity = summary["affinity_mean"]
    advice = []
    if summary["grad_norm_ratio"] >= DOMINANCE_NORM_RATIO:
        advice.append(
            f"one task's gradient dominates the shared parameters (median norm ratio "
            f"{summary['grad_norm_ratio']:.1f} >= {DOMINANCE_NORM_RATIO:g}): balance the losses "
            "(e.g. train.balancer=uw, gradnorm or famo) whatever the architecture"
        )
    if limited_compute:
        return Decision(HARD_SHARING, "limited compute", ["compute is limited (--limited-compute)"], advice)
    ranks = {task: len(shape) for task, shape in summary["structures"].items()}
    if len(set(ranks.values())) > 1:
        shapes = ", ".join(f"{task} {shape}" for task, shape in summary["structures"].items())
        return Decision(
            MULTI_DECODER, "different output structure",
            [f"the tasks' outputs differ in structure (prediction shape beyond batch and channels: {shapes})"], advice,
        )
    conflicts = [
        f"{pair}: cosine negative in {fraction:.0%} of steps (>= {CONFLICT_NEGATIVE_FRACTION:.0%})"
        for pair, fraction in negative.items() if fraction >= CONFLICT_NEGATIVE_FRACTION
    ]
    for a, b in combinations(summary["structures"], 2):
        forward, backward = affinity.get(f"{a}->{b}"), affinity.get(f"{b}->{a}")
        if forward is not None and backward is not None and forward < 0 and backward < 0:
            conflicts.append(f"{a}<->{b}: a step on either raises the other's loss (affinity {forward:+.2e}, {backward:+.2e})")
    if conflicts:
        return Decision(SOFT_SHARING, "tasks conflict", conflicts, advice)
    weak = [f"{pair}: mean cosine {value:+.3f} < {SIMILAR_COSINE}" for pair, value in cosine.items() if value < SIMILAR_COSINE]
    weak += [f"{pair}: affinity {value:+.2e} <= 0" for pair, value in affinity.items() if value <= 0]
    if not weak:
        reasons = [f"every pair's mean cosine >= {SIMILAR_COSINE} ({_pairs(cosine, '+.3f')})"]
        reasons.append(f"every affinity > 0 ({_pairs(affinity, '+.2e')})")
        return Decision(HARD_SHARING, "tasks similar", reasons, advice)
    return Decision(ADAPTERS_OR_ROUTING, "tasks loosely related", ["no conflict, but not similar: " + "; ".join(weak)], advice)


def _pairs(values: Mapping[str, float], spec: str) -> str:
    return ", ".join(f"{pair} {value:{spec}}" for pair, value in values.items())


# -- costs ------------------------------------------------------------------------------------------


def measure_cost(trainer: Trainer, steps: int) -> dict[str, Any]:
    """Parameters and the median seconds of `steps` training steps on one batch (after a warm-up step)."""
    model, experiment = trainer.model, trainer.experiment
    model.train()
    experiment.on_epoch_start(0)
    batch = experiment.to_device(next(iter(experiment.train_loader())))
    trainer.train_step(batch)
    seconds = []
    for _ in range(steps):
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        started = time.perf_counter()
        trainer.train_step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        seconds.append(time.perf_counter() - started)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_seconds": statistics.median(seconds),
    }


def measure_costs(
    candidates: Sequence[Candidate], steps: int, build_trainer: Callable[[Any, Path], Trainer], work_dir: Path
) -> list[dict[str, Any]]:
    """One row per candidate: its families, cost (`measure_cost`, at the config's precision, without
    logged diagnostics), or the note why it is not measured. A candidate that cannot be built or
    trained on this config (a ValueError) gets the error as its note."""
    rows = []
    for candidate in candidates:
        row: dict[str, Any] = {
            "architecture": candidate.name,
            "families": list(candidate.families),
            "note": candidate.note,
            "reference": candidate.reference,
        }
        if candidate.config is not None:
            config = copy.deepcopy(candidate.config)
            config.train.diagnostics_every_steps = None  # time the architecture, not the logged diagnostics
            config.train.progress = False
            try:
                row.update(measure_cost(build_trainer(config, work_dir / candidate.name), steps))
            except ValueError as err:
                row["note"] = f"does not apply: {err}"
        rows.append(row)
    reference = next((row for row in rows if row["reference"] and "step_seconds" in row), None)
    for row in rows:
        if reference is not None and "step_seconds" in row:
            row["step_time_ratio"] = row["step_seconds"] / reference["step_seconds"]
    return rows


# -- everything -------------------------------------------------------------------------------------


def probe_config(config: Any) -> Any:
    """The probe's copy of a run config: float32 (see the module docstring), no logged diagnostics."""
    config = copy.deepcopy(config)
    config.train.precision = "fp32"
    config.train.diagnostics_every_steps = None
    config.train.progress = False
    return config


def recommend(
    probe_run_config: Any,
    candidates: Sequence[Candidate],
    steps: int = 20,
    cost_steps: int = 3,
    lookahead_lr: float | None = None,
    limited_compute: bool = False,
) -> dict[str, Any]:
    """Probe `probe_run_config` (a hard-sharing model), decide, and cost every candidate.

    Returns a JSON-ready dict: ``probe`` (`ProbeResult.summary`), ``decision`` (`Decision`),
    ``recommended`` (the candidates that implement the chosen family and apply), ``candidates``
    (`measure_costs` rows), ``thresholds``.
    """
    if cost_steps < 1:
        raise ValueError(f"cost_steps must be >= 1, got {cost_steps}")
    with tempfile.TemporaryDirectory(prefix="dualhead-recommend-") as work:
        trainer = Trainer(probe_config(probe_run_config), Path(work) / "probe")
        summary = probe(trainer, steps, lookahead_lr).summary()
        del trainer
        rows = measure_costs(candidates, cost_steps, lambda config, run_dir: Trainer(config, run_dir), Path(work))
    decision = decide(summary, limited_compute)
    recommended = [row["architecture"] for row in rows if decision.family in row["families"] and "step_seconds" in row]
    return {
        "probe": summary,
        "decision": asdict(decision),
        "recommended": sorted(recommended, key=lambda name: next(r["step_seconds"] for r in rows if r["architecture"] == name)),
        "candidates": rows,
        "thresholds": {
            "similar_cosine": SIMILAR_COSINE,
            "conflict_negative_fraction": CONFLICT_NEGATIVE_FRACTION,
            "dominance_norm_ratio": DOMINANCE_NORM_RATIO,
        },
    }


def format_recommendation(result: Mapping[str, Any]) -> str:
    """The measurements, the decision with its reasons, and the cost table, as Markdown."""
    probe_summary, decision = result["probe"], result["decision"]
    lines = [
        f"## Probe: {probe_summary['steps']} steps of hard sharing ({probe_summary['measured_steps']} measured)",
        "",
        "| task pair | mean gradient cosine | steps with cosine < 0 |",
        "| --- | ---: | ---: |",
    ]
    negative = probe_summary["cosine_negative_fraction"]
    lines += [f"| {pair} | {value:+.3f} | {negative[pair]:.0%} |" for pair, value in probe_summary["cosine_mean"].items()]
    lines += ["", f"Gradient norm ratio at the shared parameters (largest / smallest, median): "
                  f"{probe_summary['grad_norm_ratio']:.2f}", ""]
    lines += [f"Inter-task affinity Z(i -> j) (lookahead SGD step, lr {probe_summary['lookahead_lr']:g}):", ""]
    lines += ["| i -> j | affinity |", "| --- | ---: |"]
    lines += [f"| {pair} | {value:+.3e} |" for pair, value in probe_summary["affinity_mean"].items()]
    lines += ["", f"## Decision: {decision['branch']} -> {decision['family']}", ""]
    lines += [f"- {reason}" for reason in decision["reasons"]]
    lines += [f"- advice: {advice}" for advice in decision["advice"]]
    recommended = result["recommended"]
    lines += ["", f"Recommended here (cheapest first): {', '.join(recommended) if recommended else 'none of the candidates'}"]
    lines += ["", "## Cost on this config", "",
              "| architecture | families | parameters | step ms | x hard sharing | note |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
    for row in result["candidates"]:
        measured = "step_seconds" in row
        lines.append(
            f"| {row['architecture']} | {', '.join(row['families'])} | "
            + (f"{row['parameters']:,} | {1000 * row['step_seconds']:.1f} | " if measured else "- | - | ")
            + (f"{row['step_time_ratio']:.2f} | " if "step_time_ratio" in row else "- | ")
            + f"{row['note']} |"
        )
    return "\n".join(lines)
