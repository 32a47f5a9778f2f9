"""The Dual-Head VQA configuration: model (encoders, fusion, heads), data, and the VQA training recipe.

``VQARunConfig`` is the core `RunConfig` with these sections; ``application: vqa`` in a YAML (or no
``application`` key at all) selects it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dualhead.backbones.config import TextConfig, VisionConfig
from dualhead.core.config import RunConfig, TrainConfig

# The reference design's schedule: equal weights, then more on the (harder) open-ended task.
REFERENCE_TASK_WEIGHTS = {
    0: {"binary": 0.5, "open": 0.5},
    11: {"binary": 0.3, "open": 0.7},
    21: {"binary": 0.2, "open": 0.8},
}


EXPERT_ROUTES = ("none", "question_type", "learned")


@dataclass
class ExpertsConfig:
    """Small expert MLPs between the fusion and the two heads: ``h + sum_k g_k * expert_k(h)``.

    The gate g is a softmax computed from the question alone (so inference and ONNX export need only
    image and tokens). ``route: question_type`` makes the gate a classifier of the training split's
    question types (one expert per type, an auxiliary cross-entropy teaches it); ``learned`` leaves
    the gate unsupervised over `count` experts, with a load-balancing term; ``none`` is off.
    """

    route: str = "none"  # none | question_type | learned
    # learned: the number of experts (>= 2); question_type: 0 (one per training type) or that number
    count: int = 0
    hidden: int = 128  # each expert's inner width
    gate_hidden: int = 128  # the gate's (type classifier's) hidden width
    dropout: float = 0.1
    type_weight: float = 0.1  # question_type: weight of the type classifier's cross-entropy
    # learned: weight of the importance loss, CV(sum of gates per expert)^2 (Shazeer et al., 2017)
    balance_weight: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.route != "none"

    def validate(self) -> None:
        """A clear error for a route or size that cannot work."""
        if self.route not in EXPERT_ROUTES:
            raise ValueError(f"unknown model.experts.route {self.route!r}; choose one of {', '.join(EXPERT_ROUTES)}")
        if self.route == "none" and self.count != 0:
            raise ValueError(
                f"model.experts.count={self.count} needs a route: set model.experts.route=learned (or question_type)"
            )
        if self.route == "learned" and self.count < 2:
            raise ValueError(f"model.experts.route=learned needs model.experts.count >= 2 experts, got {self.count}")
        if self.route == "question_type" and self.count < 0:
            raise ValueError(
                f"model.experts.count must be 0 (one expert per question type) or the number of types, got {self.count}"
            )
        if self.enabled and (self.hidden < 1 or self.gate_hidden < 1):
            raise ValueError(f"model.experts.hidden ({self.hidden}) and gate_hidden ({self.gate_hidden}) must be >= 1")


ENCODER_ADAPTERS = ("none", "adapters", "lora")


@dataclass
class EncoderAdaptersConfig:
    """Per-task modules inside both encoders (`dualhead.vqa.encoder_adapters`): each head reads the
    image and the question encoded with its own bottleneck adapters after every block (``adapters``,
    Houlsby et al. 2019) or its own LoRA updates of every linear map (``lora``, Hu et al. 2022);
    ``none`` is off. They start as the identity and train once the frozen warm-up ends, beside the
    encoders' own weights or, with ``vision.freeze`` / ``text.freeze``, alone."""

    kind: str = "none"  # none | adapters | lora
    reduction: int = 16  # adapters: bottleneck width = channels // reduction
    rank: int = 8  # lora
    alpha: float = 16.0  # lora: updates scaled by alpha / rank

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def validate(self) -> None:
        """A clear error for a kind or size that cannot work."""
        if self.kind not in ENCODER_ADAPTERS:
            raise ValueError(
                f"unknown model.encoder_adapters.kind {self.kind!r}; choose one of {', '.join(ENCODER_ADAPTERS)}"
            )
        if self.reduction < 1 or self.rank < 1 or self.alpha <= 0:
            raise ValueError(
                "model.encoder_adapters needs reduction >= 1, rank >= 1 and alpha > 0, got "
                f"{self.reduction}, {self.rank} and {self.alpha}"
            )


TOWERS = ("shared", "separate", "cross_stitch")


@dataclass
class ModelConfig:
    """The Dual-Head VQA model: encoders, fusion, heads (defaults are the reference design's)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # attention (the reference's: one image and one question vector) | cross_attention (co-attention
    # over the image's regions and the question's words) | concat | product | gated
    fusion: str = "attention"
    fusion_layers: int = 2  # co-attention layers of cross_attention
    hidden_dim: int = 256
    num_heads: int = 4
    dropout: float = 0.3  # heads
    fusion_dropout: float = 0.1
    deep_heads: bool = False
    single_head: bool = False  # one head over the union of all answers (the 'Single Head' ablation)
    router: bool = True
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    # What the two heads share above the encoders: shared (one fusion both read, the reference's) |
    # separate (one fusion per head: only the encoders are shared) | cross_stitch (one fusion per head,
    # their outputs mixed per channel by a learned cross-stitch unit, Misra et al. 2016)
    towers: str = "shared"
    stitch_self_weight: float = 0.9  # cross_stitch: what each tower keeps of its own output at start
    encoder_adapters: EncoderAdaptersConfig = field(default_factory=EncoderAdaptersConfig)

    def validate_per_head_parts(self) -> None:
        """A clear error for a `towers` or `encoder_adapters` value or combination the model cannot build."""
        if self.towers not in TOWERS:
            raise ValueError(f"model.towers must be one of {', '.join(TOWERS)}, got {self.towers!r}")
        if not 0.0 <= self.stitch_self_weight <= 1.0:
            raise ValueError(f"model.stitch_self_weight must be in [0, 1], got {self.stitch_self_weight}")
        if self.towers != "shared" and (self.single_head or self.experts.enabled):
            raise ValueError(
                f"model.towers={self.towers} gives each of the two heads its own fusion; it does not combine "
                "with model.single_head (one head) or model.experts (experts over one shared fusion)"
            )
        self.encoder_adapters.validate()
        if self.encoder_adapters.enabled and (self.single_head or self.experts.enabled):
            raise ValueError(
                f"model.encoder_adapters.kind={self.encoder_adapters.kind} gives each of the two heads its own "
                "encoder passes; it does not combine with model.single_head (one head) or model.experts "
                "(experts over one shared fusion)"
            )


@dataclass
class DataConfig:
    """Which dataset, where, and how batches are drawn."""

    format: str = "easy_vqa"  # easy_vqa | vqa_rad | slake | pathvqa | vqa_v2 | jsonl
    root: str | None = None  # where the files are; easy_vqa defaults to the installed package
    lang: str = "en"  # SLAKE only
    val_fraction: float = 0.1  # validation carved from train by image when a format has none
    min_answer_count: int = 1
    max_answers: int | None = None
    skip_invalid: bool = False
    # Image paths that resolve outside data.root (../x, absolute paths, symlinks out) are refused
    # unless this is set (a symlinked image folder, a shared image store).
    allow_outside_root: bool = False
    # Keep only these tasks' questions (binary, open) in every split: a single-task model, as in
    # the 'Separate models' ablation. None keeps all.
    tasks: list[str] | None = None
    # Decode every distinct image while loading: a corrupt one is an error at once (or, with
    # skip_invalid, its records are skipped and counted) rather than a failure mid-training.
    verify_images: bool = False
    batch_size: int = 64
    questions_per_image: int = 4  # the grouped sampler's cap of questions per image in one batch
    num_workers: int = 0
    augment: bool = False
    cache_images: bool = True
    image_cache_bytes: int | None = 1073741824  # bound of the decoded-image cache (null: unbounded)


@dataclass
class VQATrainConfig(TrainConfig):
    """The core recipe plus the reference design's VQA objective and the frozen-encoder stages."""

    metric: str | None = "accuracy"  # routed overall validation accuracy picks `best/`
    loss: str = "focal"  # focal | ce
    focal_gamma: float = 2.5
    class_weights: str = "inverse_frequency"  # inverse_frequency | none
    label_smoothing: float = 0.0
    # Task weights {first_epoch: {task: weight}} for the fixed balancer; null means the reference
    # design's schedule (REFERENCE_TASK_WEIGHTS). A schedule given here replaces it whole.
    task_weight_schedule: dict[int, dict[str, float]] | None = None
    router_weight: float = 0.1
    cache_frozen_features: bool = True
    # Train fusion and heads on cached features of the frozen encoders for this many epochs, then
    # fine-tune everything ("linear probing then fine-tuning", Kumar et al., ICLR 2022).
    frozen_warmup_epochs: int = 0


@dataclass
class PretrainConfig:
    """Contrastive image-text pretraining of the two encoders on the training split (CLIP's symmetric
    InfoNCE, `dualhead.vqa.pretrain`). ``epochs > 0`` makes it the first step of a new run: the
    encoders of the epoch with the best validation image-to-text recall@1 are where the dual-head
    training starts (written to ``RUN/pretrain/``). ``dualhead pretrain`` runs it on its own."""

    epochs: int = 0  # 0: off
    batch_size: int = 32  # distinct images per batch, so this many negatives per positive, less one
    encoder_lr: float = 2e-5
    projection_lr: float = 1e-3
    projection_dim: int = 256
    temperature: float = 0.07  # initial; learned, as in CLIP
    with_answers: bool = True  # pair the image with "question answer" rather than the question alone
    augment: bool = True


@dataclass
class VQARunConfig(RunConfig):
    """Everything one ``dualhead train`` run of the Dual-Head VQA model needs."""

    application: str = "vqa"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: VQATrainConfig = field(default_factory=VQATrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
