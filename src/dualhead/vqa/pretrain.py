"""Contrastive image-text pretraining (``dualhead pretrain``): align the two encoders on the training
split before the heads train.

CLIP's objective (Radford et al., 2021) as PubMedCLIP brings it to medical VQA (Eslami et al., 2023):
InfoNCE with in-batch negatives. Each batch holds distinct images, each paired with one of its
questions (with its answer: "question answer"), so no negative shares the positive's image; a
learned temperature scales the cosine similarities and a symmetric cross-entropy pulls matched pairs
together. The epoch whose validation image-to-text recall@1 is best is kept, where the VQA config
loads it: ``model.vision.weights=OUT/best/vision.safetensors model.text.name=OUT/best/text``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoModel

from dualhead.backbones.text import build_text_encoder
from dualhead.backbones.vision import build_vision_encoder
from dualhead.core import distributed
from dualhead.core.checkpoints import save_checkpoint
from dualhead.core.io import atomic_write_json
from dualhead.core.runtime import autocast_context, resolve_device, seed_everything
from dualhead.vqa.config import PretrainConfig, VQARunConfig
from dualhead.vqa.data import ImagePreprocessor, ImageStore, VQARecord, load_splits, question_allows_flip
from dualhead.vqa.model import DualHeadVQA

log = logging.getLogger(__name__)

VISION_FILE = "vision.safetensors"
TEXT_DIR = "text"
SUMMARY_FILE = "pretrain.json"
RUN_SUBDIR = "pretrain"  # where a run with ``pretrain.epochs > 0`` pretrains


class ContrastiveEncoders(nn.Module):
    """The VQA model's two encoders with projection heads into one embedding space."""

    def __init__(self, config: VQARunConfig, options: PretrainConfig):
        super().__init__()
        # Both encoders train here, whether or not the dual-head model freezes them afterwards.
        self.vision = build_vision_encoder(dataclasses.replace(config.model.vision, freeze=False))
        self.text = build_text_encoder(dataclasses.replace(config.model.text, freeze=False))
        self.image_projection = nn.Linear(self.vision.out_dim, options.projection_dim)
        self.text_projection = nn.Linear(self.text.out_dim, options.projection_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / options.temperature)))
        data = self.vision.data_config
        self.preprocessor = ImagePreprocessor(
            data["input_size"][-1], tuple(data["mean"]), tuple(data["std"]), data.get("interpolation", "bicubic")
        )

    def similarities(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scaled cosine similarities [images, texts]."""
        images = F.normalize(self.image_projection(self.vision(pixel_values)).float(), dim=-1)
        texts = F.normalize(self.text_projection(self.text(input_ids, attention_mask)).float(), dim=-1)
        return self.log_scale.clamp(max=math.log(100)).exp() * images @ texts.T

    def save_pretrained(self, directory: Path) -> None:
        """The encoders where a VQA config loads them: the timm model's state dict and a Hugging Face
        directory (weights, architecture, tokenizer)."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.vision.timm_state_dict().items()}
        save_file(state, str(directory / VISION_FILE), metadata={"format": "pt"})
        self.text.model.save_pretrained(directory / TEXT_DIR)
        self.text.tokenizer.save_pretrained(directory / TEXT_DIR)


def contrastive_loss(similarities: Tensor) -> Tensor:
    """Symmetric InfoNCE: row i's positive is column i (image -> text and text -> image)."""
    target = torch.arange(similarities.shape[0], device=similarities.device)
    return (F.cross_entropy(similarities, target) + F.cross_entropy(similarities.T, target)) / 2


def pair_batches(records: list[VQARecord], batch_size: int, rng: random.Random) -> list[list[VQARecord]]:
    """One randomly chosen question per image, images shuffled, in batches of distinct images."""
    by_image: dict[Path, list[VQARecord]] = defaultdict(list)
    for record in records:
        by_image[record.image].append(record)
    images = sorted(by_image)
    rng.shuffle(images)
    pairs = [rng.choice(by_image[image]) for image in images]
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size) if len(pairs[i : i + batch_size]) > 1]


def pair_text(record: VQARecord, with_answers: bool) -> str:
    return f"{record.question} {record.answer}" if with_answers else record.question


def _inputs(model: ContrastiveEncoders, store: ImageStore, batch: list[VQARecord], options: PretrainConfig,
            augment: bool, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    pixels = torch.stack([store.get(r.image, r.source) for r in batch])
    if augment:
        pixels = model.preprocessor.augment(pixels, [question_allows_flip(r.question) for r in batch])
    tokens = model.text.tokenize([pair_text(r, options.with_answers) for r in batch])
    return (model.preprocessor.normalize(pixels).to(device), tokens["input_ids"].to(device),
            tokens["attention_mask"].to(device))


@torch.no_grad()
def recall_at_1(model: ContrastiveEncoders, store: ImageStore, records: list[VQARecord], options: PretrainConfig,
                device: torch.device, autocast) -> float:
    """Image -> text recall@1 among all of `records`' images, one question each (fixed choice)."""
    pairs = pair_batches(records, len(records) + 1, random.Random(0))
    if not pairs:
        return float("nan")
    model.eval()
    with autocast:
        similarities = model.similarities(*_inputs(model, store, pairs[0], options, False, device))
    return float((similarities.argmax(dim=1) == torch.arange(len(pairs[0]), device=device)).float().mean())


def pretrain(config: VQARunConfig, out_dir: Path, options: PretrainConfig, progress: bool = True) -> dict[str, Any]:
    """Pretrain `config`'s encoders on its training split; writes ``OUT/best/`` and ``pretrain.json``."""
    if not isinstance(config, VQARunConfig):
        raise ValueError(f"pretrain aligns a VQA model's encoders; this config's application is {config.application!r}")
    if options.epochs < 1 or options.batch_size < 2:
        raise ValueError(f"pretrain needs at least 1 epoch and batches of 2 images, got {options.epochs} and {options.batch_size}")
    seed_everything(config.train.seed)
    device = resolve_device(config.train.device)
    autocast = autocast_context(device, config.train.precision)
    splits = load_splits(config.data, seed=config.train.seed)
    model = ContrastiveEncoders(config, options).to(device)
    store = ImageStore(model.preprocessor, cache=config.data.cache_images, max_bytes=config.data.image_cache_bytes)
    optimizer = torch.optim.AdamW([
        {"params": [*model.vision.parameters(), *model.text.parameters()], "lr": options.encoder_lr},
        {"params": [*model.image_projection.parameters(), *model.text_projection.parameters(), model.log_scale],
         "lr": options.projection_lr},
    ], weight_decay=0.01)
    rng = random.Random(config.train.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    history, best = [], {"epoch": None, "val_recall_at_1": -1.0}
    baseline = recall_at_1(model, store, splits.val, options, device, autocast)
    log.info("before pretraining: validation image->text recall@1 %.3f", baseline)
    for epoch in range(options.epochs):
        model.train()
        losses = []
        for batch in tqdm(pair_batches(splits.train, options.batch_size, rng), desc=f"pretrain epoch {epoch}", disable=not progress):
            with autocast:
                loss = contrastive_loss(model.similarities(*_inputs(model, store, batch, options, options.augment, device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        recall = recall_at_1(model, store, splits.val, options, device, autocast)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "val_recall_at_1": recall})
        log.info("pretrain epoch %d: loss %.4f, validation recall@1 %.3f", epoch, history[-1]["train_loss"], recall)
        if recall > best["val_recall_at_1"]:
            best = {"epoch": epoch, "val_recall_at_1": recall}
            save_checkpoint(out_dir / "best", model, {"epoch": epoch})
    overrides = [f"model.vision.weights={out_dir / 'best' / VISION_FILE}", f"model.text.name={out_dir / 'best' / TEXT_DIR}"]
    # The saved text model has its shape; options that shaped a random init no longer apply.
    overrides += [f"model.text.{key}=null" for key in ("weights", "num_layers", "hidden_size")
                  if getattr(config.model.text, key) is not None]
    summary = {"options": asdict(options), "data": config.data.format, "vision": config.model.vision.name,
               "text": config.model.text.name, "val_recall_at_1_before": baseline, "history": history,
               "best": best, "overrides": overrides}
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def load_pretrained_encoders(model: DualHeadVQA, directory: Path) -> None:
    """Load the encoders `pretrain` kept (``OUT/best``) into a dual-head model built from the same
    config, in place (an optimiser holding the parameters keeps them)."""
    model.vision.load_timm_state_dict(load_file(str(directory / VISION_FILE)))
    text = AutoModel.from_pretrained(directory / TEXT_DIR, local_files_only=True)
    model.text.model.load_state_dict(text.state_dict())


def pretrain_run(config: VQARunConfig, model: DualHeadVQA, run_dir: Path) -> None:
    """A run's first step when ``pretrain.epochs > 0``: pretrain into ``RUN/pretrain`` (the main
    process; a resumed run reuses a finished pretraining) and start `model` from its best encoders."""
    out_dir = run_dir / RUN_SUBDIR
    if distributed.is_main():
        if (out_dir / SUMMARY_FILE).is_file():
            log.info("reusing the finished pretraining in %s", out_dir)
        else:
            pretrain(config, out_dir, config.pretrain, progress=config.train.progress)
    distributed.barrier()
    load_pretrained_encoders(model, out_dir / "best")
