"""The Dual-Head VQA experiment: what the core Trainer needs to train and score the VQA model.

VQA's own parts of a run live here: grouped batches (each image encoded once), frozen-encoder
stages with their feature cache (frozen warm-up, then fine-tuning), the auxiliary losses of the router
and the experts' gate,
the reference schedule of task weights, and scoring with routed and oracle accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from dualhead.backbones.freeze import freeze_module, is_frozen, unfreeze_module
from dualhead.core import distributed
from dualhead.core.experiment import Experiment
from dualhead.vqa.config import REFERENCE_TASK_WEIGHTS, VQARunConfig
from dualhead.vqa.data import AnswerVocab, ImageStore, VQARecord, VQASplits, load_splits
from dualhead.vqa.data.answers import first_difference
from dualhead.vqa.data.batching import GroupedBatchSampler, VQABatch, VQACollator
from dualhead.vqa.data.question_types import question_type_vocabulary
from dualhead.vqa.experts import importance_loss, type_loss
from dualhead.vqa.features import EncoderFeatureCache, model_inputs
from dualhead.vqa.metrics import HeadProbabilities, binary_confusion, format_metrics_table, score
from dualhead.vqa.model import ANSWERS_FILE, DualHeadOutput, DualHeadVQA, read_question_types
from dualhead.vqa.plots import plot_confusion
from dualhead.vqa.pretrain import pretrain_run
from dualhead.vqa.tasks import build_tasks, router_loss

VALIDATION_METRICS = (
    "accuracy", "binary_accuracy", "open_accuracy", "oracle_accuracy", "router_accuracy", "question_type_accuracy",
    "vqa_accuracy",
)


@dataclass
class Prediction:
    """A split's records in evaluation order, with head probabilities."""

    records: list[VQARecord]
    probs: HeadProbabilities


class VQAExperiment(Experiment):
    """Dual-Head VQA on one dataset: splits, answer vocabulary, model, tasks, stages, scoring."""

    default_metric = "accuracy"

    def __init__(self, config: VQARunConfig, splits: VQASplits | None = None):
        train_cfg = config.train
        self.splits = splits if splits is not None else load_splits(config.data, seed=train_cfg.seed)
        if not self.splits.train:
            raise ValueError(f"the {config.data.format} training split is empty")
        self.vocab = AnswerVocab.from_records(self.splits.train, config.data.min_answer_count, config.data.max_answers)
        self.soft_targets = any(r.answer_scores for r in self.splits.train)
        model = DualHeadVQA(config.model, self.vocab, question_types=training_question_types(config, self.splits.train))
        super().__init__(config, model, build_tasks(train_cfg, self.vocab, self.splits.train, config.model.single_head, self.soft_targets))
        self.store = ImageStore(model.preprocessor, cache=config.data.cache_images, max_bytes=config.data.image_cache_bytes)
        self._sampler = GroupedBatchSampler(
            self.splits.train, config.data.batch_size, config.data.questions_per_image, shuffle=True, seed=train_cfg.seed
        )
        # Which encoders are frozen now and whether encoder adapters train; the feature cache and the
        # loader follow (see `on_epoch_start`).
        self.stage: tuple[bool, bool, bool] | None = None
        self.cache: EncoderFeatureCache | None = None
        self._train_loader: DataLoader | None = None

    # -- the Experiment interface ------------------------------------------------------------------

    @property
    def metric_directions(self) -> dict[str, bool]:
        """The validation metrics this run's model and data can produce (all higher-is-better)."""
        model, tasks = self.config.model, self.config.data.tasks
        produced = {"accuracy", "oracle_accuracy"}
        if not model.single_head:
            produced |= {f"{task}_accuracy" for task in (tasks or ("binary", "open"))}
            if model.router:
                produced.add("router_accuracy")
        if model.experts.route == "question_type":
            produced.add("question_type_accuracy")
        if self.soft_targets:
            produced.add("vqa_accuracy")
        return {name: True for name in VALIDATION_METRICS if name in produced}

    def check_checkpoint(self, directory: Path) -> None:
        """The model configuration, and the answer vocabulary in the same order: a reordered or new
        answer would silently mislabel every prediction."""
        super().check_checkpoint(directory)
        answers_file = Path(directory) / ANSWERS_FILE
        try:
            saved = AnswerVocab.from_json(json.loads(answers_file.read_text(encoding="utf-8"))).open_answers
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the checkpoint's answer vocabulary {answers_file}: {err}") from None
        current = self.vocab.open_answers
        if saved != current:
            position, theirs, ours = first_difference(saved, current)
            raise ValueError(
                f"the answer vocabulary rebuilt from the data differs from the checkpoint's ({answers_file}): at "
                f"position {position} the checkpoint has {theirs}, the data gives {ours} "
                f"({len(saved)} vs {len(current)} open answers); has the dataset changed since the run started?"
            )
        saved_types = read_question_types(Path(directory))
        if saved_types != self.model.question_types:
            raise ValueError(
                f"the question types rebuilt from the data ({', '.join(self.model.question_types) or 'none'}) differ from "
                f"the checkpoint's {directory} ({', '.join(saved_types) or 'none'}): each is an expert's class, "
                "so the checkpoint would route wrongly; has the dataset changed since the run started?"
            )

    def default_balancer_options(self, balancer: str) -> dict[str, Any]:
        if balancer != "fixed" or self.config.model.single_head:  # one task: the schedule's tasks do not apply
            return {}
        return {"schedule": self.config.train.task_weight_schedule or REFERENCE_TASK_WEIGHTS}

    @property
    def stage_boundary_epoch(self) -> int:
        return self.config.train.frozen_warmup_epochs

    @property
    def train_sampler(self) -> GroupedBatchSampler:
        return self._sampler

    def train_loader(self) -> DataLoader:
        if self._train_loader is None:
            self.on_epoch_start(0)
        return self._train_loader

    def has_split(self, split: str) -> bool:
        return bool(self.splits.split(split))

    def prepare(self, run_dir: Path) -> None:
        """Contrastive pretraining of the encoders first, when the config asks for it."""
        if self.config.pretrain.epochs > 0:
            pretrain_run(self.config, self.model, run_dir)

    def on_epoch_start(self, epoch: int) -> None:
        """Freeze the encoders the config (or the frozen warm-up) freezes at `epoch`; cache their
        features and rebuild the training loader when that changes."""
        cfg = self.config
        warm_up = epoch < cfg.train.frozen_warmup_epochs
        # Encoder adapters train from the end of the warm-up on: from then the encoders run live
        # (once per head), frozen weights or not, and nothing is cached.
        adapters_train = cfg.model.encoder_adapters.enabled and not warm_up
        stage = (cfg.model.vision.freeze or warm_up, cfg.model.text.freeze or warm_up, adapters_train)
        if stage == self.stage:
            return
        for module, frozen in zip((self.model.vision, self.model.text), stage[:2], strict=True):
            if frozen and not is_frozen(module):
                freeze_module(module)
            elif not frozen and is_frozen(module):
                unfreeze_module(module)
        self.stage = stage
        self.cache = None
        if cfg.train.cache_frozen_features and any(stage[:2]) and not adapters_train:
            self.cache = self.build_cache(images=stage[0], texts=stage[1])
        self._train_loader = self.loader(self.splits.train, self._sampler, augment=cfg.data.augment)

    def batch_size_of(self, batch: VQABatch) -> int:
        return len(batch.records)

    def forward(self, batch: VQABatch) -> DualHeadOutput:
        return self.model(**model_inputs(batch, self.cache))

    def auxiliary_loss(self, output: DualHeadOutput, batch: VQABatch) -> Tensor | None:
        """The router's weighted loss plus the experts' (see `experts_loss`); None when neither exists."""
        terms = [self.experts_loss(output, batch)]
        if output.router_logits is not None:
            terms.append(router_loss(output.router_logits, batch) * self.config.train.router_weight)
        terms = [term for term in terms if term is not None]
        return sum(terms) if terms else None

    def experts_loss(self, output: DualHeadOutput, batch: VQABatch) -> Tensor | None:
        """The experts' gate, weighted: the type classifier's cross-entropy (route question_type) or the
        load-balancing importance loss (route learned); None without experts."""
        experts = self.config.model.experts
        if output.gate_logits is None:
            return None
        if experts.route == "question_type":
            if batch.type_target is None:
                raise ValueError("a batch for a type-routed model has no type_target: build it with the model's question_types")
            return type_loss(output.gate_logits, batch.type_target) * experts.type_weight
        return importance_loss(output.gate_logits) * experts.balance_weight

    def evaluate(self, split: str, final: bool = False) -> dict[str, Any]:
        """Routed and oracle accuracy, per head and per answer type (and the binary confusion matrix
        for the final evaluation)."""
        prediction = self.predict(self.splits.split(split))
        metrics, _ = score(prediction.probs, prediction.records, self.vocab, self.model.question_types)
        if final:
            metrics["binary_confusion"] = binary_confusion(prediction.probs, prediction.records)
        return metrics

    def report(self, results: Mapping[str, Any]) -> str:
        name = Path(results["checkpoint"]).name
        tables = [
            format_metrics_table({k: v for k, v in results[split].items() if k != "binary_confusion"}, f"{split} ({name})")
            for split in ("val", "test") if split in results
        ]
        return "\n\n".join(tables)

    def plot(self, run_dir: Path, results: Mapping[str, Any]) -> list[Path]:
        return plot_confusions(run_dir, results)

    # -- VQA's own ---------------------------------------------------------------------------------

    def build_cache(self, images: bool, texts: bool) -> EncoderFeatureCache:
        """The frozen encoders' features of every split's distinct images and/or questions, computed once:
        with several processes, each encodes its share and all gather the whole cache."""
        records = self.splits.train + self.splits.val + self.splits.test
        progress = self.config.train.progress and distributed.is_main()

        def build(subset: list[VQARecord], images: bool, texts: bool) -> EncoderFeatureCache:
            return EncoderFeatureCache.build(
                self.model, subset, self.store, self.device, self.autocast(), images, texts, progress=progress
            )

        def image_features(subset: list[VQARecord]) -> tuple[dict, Tensor]:
            built = build(subset, images=True, texts=False)
            return built.image_rows, built.image_features

        def text_features(subset: list[VQARecord]) -> tuple[dict, Tensor]:
            built = build(subset, images=False, texts=True)
            return built.question_rows, built.text_features

        if not distributed.is_distributed():
            return build(records, images, texts)
        cache = EncoderFeatureCache()
        if images:
            cache.image_rows, cache.image_features = gather_shared_features(
                records, attrgetter("image"), image_features
            )
        if texts:
            cache.question_rows, cache.text_features = gather_shared_features(
                records, attrgetter("question"), text_features
            )
        return cache

    def loader(self, records: list[VQARecord], sampler: GroupedBatchSampler, augment: bool = False) -> DataLoader:
        return make_loader(self.model, records, sampler, self.store, self.cache, self.config.data.num_workers, augment, self.soft_targets)

    def predict(self, records: list[VQARecord]) -> Prediction:
        """Head probabilities for `records` (in grouped order) with the current weights."""
        loader = self.loader(records, eval_sampler(records, max(self.config.data.batch_size, 128)))
        return collect_probabilities(self.predict_batches(loader))


def training_question_types(config: VQARunConfig, train: list[VQARecord]) -> list[str]:
    """The type classifier's classes for ``model.experts.route=question_type`` (else none): the training
    split's question types; a dataset without any is an error naming the format and the option."""
    if config.model.experts.route != "question_type":
        return []
    types = question_type_vocabulary(train)
    if not types:
        raise ValueError(
            f"model.experts.route=question_type needs question types, but no question of the {config.data.format} "
            "training split has one (VQA-RAD's question_type, SLAKE's content_type, a question_type field in jsonl/csv); "
            "use model.experts.route=learned (with model.experts.count), or model.experts.route=none"
        )
    return types


def gather_shared_features(
    records: list[VQARecord],
    key: Callable[[VQARecord], Any],
    encode: Callable[[list[VQARecord]], tuple[dict, Tensor]],
) -> tuple[dict, Tensor]:
    """Rows and features of every distinct ``key(record)``, each process encoding every N-th one (with
    `encode`: records -> (rows by key, features)) and gathering the others'. With fewer distinct keys
    than processes, each process encodes them all."""
    keys = list(dict.fromkeys(key(record) for record in records))
    rank, world = distributed.rank(), distributed.world_size()
    if len(keys) < world:
        return encode(records)
    mine = keys[rank::world]
    wanted = set(mine)
    rows, features = encode([record for record in records if key(record) in wanted])
    shares = distributed.all_gather_rows(features[[rows[k] for k in mine]])
    order = [k for r in range(world) for k in keys[r::world]]
    return {k: row for row, k in enumerate(order)}, torch.cat(shares)


def collect_probabilities(outputs: Iterable[tuple[VQABatch, DualHeadOutput]]) -> Prediction:
    """Head probabilities of (batch, output) pairs, with the records in the same order."""
    ordered, parts = [], []
    for batch, output in outputs:
        ordered += batch.records
        parts.append(HeadProbabilities.from_output(output))
    return Prediction(ordered, HeadProbabilities.concat(parts))


def plot_confusions(run_dir: Path, results: Mapping[str, Any]) -> list[Path]:
    """The binary head's confusion matrix per evaluated split."""
    written = []
    for split in ("test", "val"):
        if split in results and "binary_confusion" in results[split]:
            path = Path(run_dir) / f"confusion_binary_{split}.png"
            plot_confusion(results[split]["binary_confusion"], path, f"binary head, {split} split")
            written.append(path)
    return written


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
        store.for_workers(num_workers) if num_workers > 0 else store,
        model.text.tokenize,
        augment=augment,
        soft_targets=soft_targets,
        load_images=not (cache and cache.has_images),
        load_text=not (cache and cache.has_text),
        question_types=model.question_types,
    )
    # A generator of its own: iterating must not draw from the global RNG, or a run resumed
    # mid-epoch would see different dropout masks than an uninterrupted one. Workers are not
    # persistent: each epoch's workers take their seeds from the generator the Trainer reseeds per
    # epoch, so a resumed run's augmentation is the uninterrupted run's.
    return DataLoader(
        records, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def eval_sampler(
    records: list[VQARecord], batch_size: int = 128, questions_per_image: int = 16, seed: int = 0
) -> GroupedBatchSampler:
    """Deterministic grouped batches for evaluation (many questions per image: no gradients to balance);
    `seed` seeds the loader's workers (their augmentation, in test-time augmentation)."""
    return GroupedBatchSampler(records, batch_size, questions_per_image, shuffle=False, seed=seed)
