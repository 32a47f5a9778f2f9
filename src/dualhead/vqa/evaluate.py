"""Evaluate saved checkpoints (one, or an ensemble averaging their probabilities) on a dataset split,
optionally averaging each checkpoint's probabilities over augmented views of the images (test-time
augmentation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dualhead.core.config import load_config
from dualhead.core.experiment import inference
from dualhead.core.runtime import autocast_context, resolve_device
from dualhead.vqa.config import DataConfig, VQARunConfig
from dualhead.vqa.data import AnswerVocab, ImageStore, load_splits
from dualhead.vqa.experiment import collect_probabilities, eval_sampler, make_loader
from dualhead.vqa.features import model_inputs
from dualhead.vqa.metrics import HeadProbabilities, binary_confusion, score
from dualhead.vqa.model import CONFIG_FILE, DualHeadVQA

TTA_SEED = 1_000  # view k of test-time augmentation draws its augmentation from seed TTA_SEED + k


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its `best/` (else `last/`) checkpoint; a checkpoint directory is itself."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    for name in ("best", "last"):
        if (path / name / CONFIG_FILE).is_file():
            return path / name
    raise FileNotFoundError(f"{path} is neither a saved model (no {CONFIG_FILE}) nor a run directory with best/ or last/")


def run_config_for(checkpoint: Path) -> VQARunConfig | None:
    """The config.yaml of the run a checkpoint belongs to, if it is inside one."""
    candidate = checkpoint.parent / "config.yaml"
    return load_config(candidate) if candidate.is_file() else None


def evaluate_checkpoints(
    paths: list[str | Path],
    split: str = "test",
    data: DataConfig | None = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    tta: int = 0,
) -> dict[str, Any]:
    """Metrics of one checkpoint, or of the ensemble of several (mean of their probabilities).

    `tta` > 0 adds that many augmented views of every image (the training augmentation: a small crop,
    rotation and brightness/contrast change, a flip only where the question allows one) to the plain
    view, and averages each checkpoint's probabilities over its views. View k is drawn from seed
    ``TTA_SEED + k``, so the same command gives the same figures.

    The dataset is the one the first checkpoint's run trained on unless `data` is given. Members
    whose open-answer vocabularies differ (runs of other seeds hold out other validation questions)
    answer over the union of their vocabularies, each giving 0 to the answers it never learned.
    """
    checkpoints = [resolve_checkpoint(p) for p in paths]
    run_config = run_config_for(checkpoints[0])
    if data is None:
        if run_config is None:
            raise ValueError(f"{checkpoints[0]} is not inside a run directory: name the dataset with --format and --root")
        data = run_config.data
    # The run's seed carves the same validation split the run held out.
    splits = load_splits(data, seed=run_config.train.seed if run_config else 0)
    records = splits.split(split)
    if not records:
        raise ValueError(f"the {data.format} dataset has no {split} split")
    if tta < 0:
        raise ValueError(f"tta is a number of augmented views, at least 0; got {tta}")
    torch_device = resolve_device(device)
    members, vocabs = [], []
    question_types: list[str] | None = None  # the members' type vocabulary, if they share one
    for checkpoint in checkpoints:
        model = DualHeadVQA.from_pretrained(checkpoint).to(torch_device)
        vocabs.append(model.vocab)
        question_types = model.question_types if question_types in (None, model.question_types) else []
        store = ImageStore(model.preprocessor)  # decoded once, shared by the views

        def step(batch, model=model):
            batch = batch.to(torch_device)
            with autocast_context(torch_device, precision):
                return batch, model(**model_inputs(batch))

        views = []
        for view in range(1 + tta):
            # the plain view, then augmented ones; a sampler seed per view gives workers their own draws
            loader = make_loader(model, records, eval_sampler(records, seed=view), store, num_workers=data.num_workers,
                                 augment=view > 0)
            with torch.random.fork_rng(devices=[]):  # the views' draws leave the caller's RNG as it was
                torch.manual_seed(TTA_SEED + view)
                prediction = collect_probabilities(inference(model, loader, step, progress))
            views.append(prediction.probs)
        members.append(HeadProbabilities.average(views))
        ordered = prediction.records
    vocab = vocabs[0]
    if any(other.open_answers != vocab.open_answers for other in vocabs[1:]):
        vocab = AnswerVocab(list(dict.fromkeys(answer for member in vocabs for answer in member.open_answers)))
        members = [probs.onto(member, vocab) for probs, member in zip(members, vocabs, strict=True)]
    probs = HeadProbabilities.average(members)
    metrics, _ = score(probs, ordered, vocab, question_types)
    metrics["binary_confusion"] = binary_confusion(probs, ordered)
    return {"checkpoints": [str(c) for c in checkpoints], "split": split, "dataset": data.format, "tta": tta,
            "metrics": metrics}
