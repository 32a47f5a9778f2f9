"""Ablation and comparison studies: model variants trained on the same data, budget and seeds.

`dualhead ablate` runs the reference design's ablation (`ABLATION`), `dualhead compare` its
comparison with other encoders (`COMPARISON`). Each variant is a list of config overrides on one
base config; each (variant, seed) trains in ``out/<variant>/seed<k>/``. A finished run (its
``result.json`` exists) is read back, an interrupted one resumes from its ``last/`` checkpoint, so
a study that dies continues where it stopped. Variants with the same name share their runs: an
ablation and a comparison written to one directory train the full model once.

Accuracy columns use the true question type to pick the head ("oracle" routing): each separate
model knows one task only, so this is the only routing all rows share. Routed accuracy (the
model's own router decides) is reported beside it.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dualhead.backbones.offline import MissingWeights, require_installed
from dualhead.backbones.text import TEXT_ARCHITECTURES
from dualhead.backbones.vision import OFFLINE_VISION_WEIGHTS, VISION_ARCHITECTURES
from dualhead.core.config import config_to_dict, load_config, with_overrides
from dualhead.core.io import atomic_write_json, atomic_write_text
from dualhead.core.plots import read_metrics
from dualhead.core.trainer import Trainer
from dualhead.vqa.config import VQARunConfig as RunConfig
from dualhead.vqa.data import load_splits
from dualhead.vqa.data.records import BINARY, OPEN, VQARecord
from dualhead.vqa.model import DualHeadVQA
from dualhead.vqa.plots import plot_study

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
METRICS = ("overall", "binary", "open")  # oracle-routed accuracy; see the module docstring
LATENCY_QUESTIONS = 20


@dataclass(frozen=True)
class Variant:
    """One row of a study: overrides on the base config, or one model per task."""

    name: str  # directory name, shared between studies
    label: str
    overrides: tuple[str, ...] = ()
    separate_tasks: bool = False  # one model per task, each trained only on its task's questions
    # The reference design's expected figures for this row, in percent: {"overall": 67, ...}
    reference: dict[str, float] | None = None


ABLATION = (
    Variant("full", "Full model (shared backbone, attention fusion, two heads)", reference={"overall": 67, "binary": 83, "open": 62}),
    # Each keeps its router: trained on one task's questions, it sends every question to that head.
    Variant("separate", "Separate models (one per task)", separate_tasks=True,
            reference={"overall": 64, "binary": 82, "open": 58}),
    Variant("concat_fusion", "No attention fusion (concatenation)", ("model.fusion=concat",), reference={"overall": 63, "binary": 80, "open": 57}),
    Variant("frozen_encoders", "Frozen encoders", ("model.vision.freeze=true", "model.text.freeze=true", "train.frozen_warmup_epochs=0"),
            reference={"overall": 62, "binary": 78, "open": 56}),
    Variant("single_head", "Single head (one head over all answers)", ("model.single_head=true", "model.router=false"),
            reference={"overall": 60, "binary": 75, "open": 55}),
)

_RANDOM_VISION = "model.vision.weights=none"
# Pretrained larger encoders (ImageNet EfficientNet-Lite2 at its native 260 px, all-mpnet-base-v2:
# BERT-base sized); their weights come with the `large` extra and the MPNet packages (see README).
_LITE2 = "model.vision.name=efficientnet_lite2"
_MPNET = "model.text.name=mpnet"
COMPARISON = (
    Variant("full", "Default encoders (the config's)"),
    # Experts between the fusion and the heads (dualhead.vqa.experts); question_type needs typed data
    # (VQA-RAD's question_type, SLAKE's content_type, a jsonl question_type field).
    Variant("experts_by_type", "Experts per question type (gate: a type classifier)", ("model.experts.route=question_type",)),
    Variant("experts_learned", "Experts with a learned gate (4 experts)", ("model.experts.route=learned", "model.experts.count=4")),
    # A fusion per head over the shared encoders; cross-stitched: their outputs mixed per channel.
    Variant("towers_separate", "Task towers (a fusion per head, shared encoders)", ("model.towers=separate",)),
    Variant("towers_cross_stitch", "Cross-stitched task towers", ("model.towers=cross_stitch",)),
    # Each head runs the encoders with its own adapters / LoRA updates (dualhead.vqa.encoder_adapters).
    Variant("encoder_adapters", "Adapters per head in both encoders", ("model.encoder_adapters.kind=adapters",)),
    Variant("encoder_lora", "LoRA per head in both encoders", ("model.encoder_adapters.kind=lora",)),
    Variant("lite2_minilm", "EfficientNet-Lite2 + MiniLM-L6 (pretrained)", (_LITE2,)),
    Variant("lite0_mpnet", "EfficientNet-Lite0 + MPNet-base (pretrained)", (_MPNET,)),
    Variant("lite2_mpnet", "EfficientNet-Lite2 + MPNet-base (pretrained)", (_LITE2, _MPNET)),
    Variant("mobilenetv3_distilbert", "MobileNetV3-Small + DistilBERT (random init)",
            ("model.vision.name=mobilenetv3_small_100", _RANDOM_VISION, "model.text.name=distilbert"),
            reference={"overall": 67, "binary": 83, "open": 62, "parameters": 68e6, "hours": 2}),
    Variant("resnet50_bert", "ResNet-50 + BERT-base (random init)",
            ("model.vision.name=resnet50", _RANDOM_VISION, "model.text.name=bert-base"),
            reference={"overall": 68, "binary": 85, "open": 64, "parameters": 150e6, "hours": 6}),
    Variant("vit_bert", "ViT-B/16 + BERT-base (random init)",
            ("model.vision.name=vit_base_patch16_224", _RANDOM_VISION, "model.text.name=bert-base"),
            reference={"overall": 70, "binary": 87, "open": 66, "parameters": 200e6, "hours": 8}),
    ABLATION[1],
    ABLATION[4],
)
STUDIES = {"ablation": ABLATION, "comparison": COMPARISON}


# -- one training run -------------------------------------------------------------------------------


def _comparable(config: RunConfig) -> dict:
    """A config as a dict without what may differ between a run and its resumption."""
    data = config_to_dict(config)
    data["train"].pop("progress", None)
    data.pop("output_dir", None)
    data.pop("name", None)
    return data


def train_or_resume(config: RunConfig, run_dir: Path, measure: Callable[[Trainer], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The result of the run in `run_dir`: read if finished, else trained (resumed if it has `last/`).

    A directory holding a run of a different config is an error, never silently reused.
    """
    result_file = run_dir / RESULT_FILE
    saved = run_dir / "config.yaml"
    if saved.is_file() and _comparable(load_config(saved)) != _comparable(config):
        raise ValueError(f"{run_dir} holds a run of a different configuration; use another --out directory or remove it")
    if result_file.is_file():
        log.info("%s is finished: not trained again", run_dir)
        return json.loads(result_file.read_text())
    resumed = saved.is_file()  # resume recovers an interrupted checkpoint swap, or starts a run that has none
    if resumed:
        log.info("resuming %s", run_dir)
        trainer = Trainer.resume(run_dir)
        trainer.config.train.progress = config.train.progress
    else:
        trainer = Trainer(config, run_dir)
    started = time.perf_counter()
    fitted = trainer.fit()
    result = {
        "test": fitted["test"],
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "wall_seconds": time.perf_counter() - started,
        "resumed": resumed,  # then the wall time covers only the part after the resumption
        **epoch_seconds(run_dir, config),
        **(measure(trainer) if measure else {}),
    }
    atomic_write_json(result_file, result)
    return result


def epoch_seconds(run_dir: Path, config: RunConfig) -> dict[str, float | None]:
    """Mean training seconds per epoch (the optimisation loop only), on cached frozen features and
    with encoders fine-tuned, from the run's metrics.jsonl."""
    frozen, tuned = [], []
    always_frozen = config.model.vision.freeze and config.model.text.freeze
    for row in read_metrics(run_dir):
        if row.get("kind") == "epoch" and "train/seconds" in row:
            epoch = row["epoch"] - 1  # logged after the epoch counter moved on
            stage = frozen if always_frozen or epoch < config.train.frozen_warmup_epochs else tuned
            stage.append(row["train/seconds"])
    return {
        "frozen_epoch_seconds": statistics.mean(frozen) if frozen else None,
        "finetune_epoch_seconds": statistics.mean(tuned) if tuned else None,
    }


def inference_latency(trainer: Trainer, questions: int = LATENCY_QUESTIONS) -> dict[str, float]:
    """Median milliseconds to answer one test question (batch of one, image file to answer string)."""
    splits = trainer.experiment.splits
    records = splits.test[: questions + 2] or splits.val[: questions + 2]
    return {"latency_ms": measure_latency(trainer.model, records)}


def measure_latency(model: DualHeadVQA, records: Sequence[VQARecord]) -> float:
    """Median ms of `model.answer` on one question, over `records` (the first two warm up)."""
    durations = []
    for index, record in enumerate(records):
        started = time.perf_counter()
        model.answer([record.image], [record.question])
        if index >= 2:
            durations.append(1000 * (time.perf_counter() - started))
    return statistics.median(durations) if durations else float("nan")


def head_accuracies(test: dict[str, Any]) -> dict[str, float | None]:
    """Overall / binary / open accuracy (true question type picks the head) and routed overall."""
    return {"overall": test["oracle_accuracy"], "binary": test["oracle_binary_accuracy"], "open": test["oracle_open_accuracy"],
            "routed_overall": test["accuracy"] if test.get("router_accuracy") is not None else None}


def combine_task_models(binary: dict[str, Any], open_: dict[str, Any]) -> dict[str, Any]:
    """One result for a pair of single-task models: each answers its own task's test questions."""
    n_binary, n_open = binary["test"]["binary_count"], open_["test"]["open_count"]
    acc_binary, acc_open = binary["test"]["oracle_binary_accuracy"], open_["test"]["oracle_open_accuracy"]
    overall = (acc_binary * n_binary + acc_open * n_open) / (n_binary + n_open)

    def total(key: str) -> float | None:
        values = [r.get(key) for r in (binary, open_)]
        return None if None in values else sum(values)

    def weighted(key: str) -> float | None:
        values = [binary.get(key), open_.get(key)]
        return None if None in values else (values[0] * n_binary + values[1] * n_open) / (n_binary + n_open)

    return {
        "accuracy": {"overall": overall, "binary": acc_binary, "open": acc_open, "routed_overall": None},
        "parameters": total("parameters"),
        "wall_seconds": total("wall_seconds"),
        "frozen_epoch_seconds": total("frozen_epoch_seconds"),
        "finetune_epoch_seconds": total("finetune_epoch_seconds"),
        "latency_ms": weighted("latency_ms"),  # each question goes to its task's model
    }


def run_variant(base: RunConfig, variant: Variant, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train (or read back) one variant at one seed; accuracy, parameters, timings, latency."""
    measure = inference_latency
    config = with_overrides(base, [*variant.overrides, f"train.seed={seed}"])
    if not variant.separate_tasks:
        result = train_or_resume(config, run_dir, measure)
        return {**{k: v for k, v in result.items() if k != "test"}, "accuracy": head_accuracies(result["test"])}
    members = {task: train_or_resume(with_overrides(config, [f"data.tasks=[{task}]"]), run_dir / task, measure) for task in (BINARY, OPEN)}
    return combine_task_models(members[BINARY], members[OPEN])


# -- a study ----------------------------------------------------------------------------------------


def run_study(
    study: str,
    base: RunConfig,
    seeds: Sequence[int],
    out_dir: Path,
    only: Sequence[str] = (),
) -> dict[str, Any]:
    """Train every variant of `study` at every seed (skipping finished runs); write the report."""
    variants = [v for v in STUDIES[study] if not only or v.name in only]
    unknown = set(only) - {v.name for v in STUDIES[study]}
    if unknown:
        raise ValueError(f"unknown {study} variant(s) {sorted(unknown)}; choose from {[v.name for v in STUDIES[study]]}")
    for variant in variants:  # the larger encoders' weights are optional packages: say so before training
        model = with_overrides(base, list(variant.overrides)).model
        try:
            require_installed(model.vision.name if model.vision.weights == "offline" else None, model.text.name)
        except MissingWeights as err:
            raise MissingWeights(f"{study} row {variant.name!r}: {err}; or leave the row out with --only") from err
    if not load_splits(base.data, seed=base.train.seed).test:
        raise ValueError(f"a {study} reports test accuracy, but the {base.data.format} data has no test split")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in variants:
        runs = []
        for seed in seeds:
            log.info("%s: %s, seed %d", study, variant.name, seed)
            runs.append(run_variant(base, variant, seed, out_dir / variant.name / f"seed{seed}"))
        rows.append(summarise(variant, base, runs))
    report = {"study": study, "seeds": list(seeds), "dataset": base.data.format, "device": _device_name(), "rows": rows}
    write_report(report, out_dir)
    return report


def summarise(variant: Variant, base: RunConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of each accuracy; means of the timings."""

    def stats(values: list[float | None]) -> dict[str, float | None]:
        values = [v for v in values if v is not None]
        if not values:
            return {"mean": None, "std": None}
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    def mean(key: str) -> float | None:
        values = [r.get(key) for r in runs if r.get(key) is not None]
        return statistics.mean(values) if values else None

    config = with_overrides(base, list(variant.overrides))
    return {
        "name": variant.name,
        "label": variant.label,
        "weights": encoder_weights(config),
        "accuracy": {key: stats([r["accuracy"][key] for r in runs]) for key in (*METRICS, "routed_overall")},
        "per_seed": [r["accuracy"] for r in runs],
        "parameters": runs[0]["parameters"],
        "wall_minutes": mean("wall_seconds") / 60 if mean("wall_seconds") is not None else None,
        "frozen_epoch_seconds": mean("frozen_epoch_seconds"),
        "finetune_epoch_seconds": mean("finetune_epoch_seconds"),
        "latency_ms": mean("latency_ms"),
        "reference": variant.reference,
    }


def encoder_weights(config: RunConfig) -> str:
    """Where the encoders' starting weights come from: pretrained (offline) or random init."""
    vision = config.model.vision
    arch = VISION_ARCHITECTURES.get(vision.name, vision.name)
    if vision.weights == "offline" and arch in OFFLINE_VISION_WEIGHTS:
        vision_source = "ImageNet"
    elif vision.weights in ("none", None, "offline"):
        vision_source = "random init"
    else:
        vision_source = f"weights from {vision.weights}"
    text = config.model.text
    if text.name in TEXT_ARCHITECTURES:
        text_source = "random init" if text.weights is None else f"weights from {text.weights}"
    else:
        text_source = "pretrained"
    return f"{vision.name}: {vision_source}; {text.name}: {text_source}"


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"


# -- the report -------------------------------------------------------------------------------------


def _percent(stat: dict[str, float | None]) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_report(report: dict[str, Any]) -> str:
    """The markdown table of a study (accuracy mean ± std over seeds, in percent)."""
    seeds = ", ".join(map(str, report["seeds"]))
    lines = [
        f"### {report['study'].capitalize()} on {report['dataset']} (seeds {seeds}; {report['device']})",
        "",
        "| Configuration | Overall | Yes/no | Open-ended | Routed overall | Parameters | Minutes per run | s/epoch frozen | "
        "s/epoch fine-tuned | Latency ms/question | Reference overall / yes-no / open | Encoder weights |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in report["rows"]:
        acc = row["accuracy"]
        ref = row["reference"]
        reference = f"{ref['overall']:.0f} / {ref['binary']:.0f} / {ref['open']:.0f}" if ref else ""
        if ref and "parameters" in ref:
            reference += f" ({ref['parameters'] / 1e6:.0f}M, {ref['hours']:g} h)"
        lines.append(
            f"| {row['label']} | {_percent(acc['overall'])} | {_percent(acc['binary'])} | {_percent(acc['open'])} | "
            f"{_percent(acc['routed_overall'])} | {row['parameters'] / 1e6:.1f}M | {_number(row['wall_minutes'], '.1f')} | "
            f"{_number(row['frozen_epoch_seconds'], '.1f')} | {_number(row['finetune_epoch_seconds'], '.1f')} | "
            f"{_number(row['latency_ms'], '.0f')} | {reference} | {row['weights']} |"
        )
    lines += [
        "",
        "Accuracy in percent, mean ± std over seeds; the true question type picks the head (each separate model knows "
        "one task), routed overall lets the model's router pick. Minutes per run: wall time of training and evaluation "
        "(separate models: both runs). Latency: median of single questions from image file to answer.",
    ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """`<study>.json`, `<study>.md` and the bar chart `<study>.png` in `out_dir`."""
    name = report["study"]
    atomic_write_json(out_dir / f"{name}.json", report)
    atomic_write_text(out_dir / f"{name}.md", format_report(report) + "\n")
    plot_study(report, out_dir / f"{name}.png")
