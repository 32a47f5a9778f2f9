"""The dense-vision configuration: model (backbone, architecture), data, and the run config.

``ScenesRunConfig`` is the core `RunConfig` with these sections; ``application: scenes`` in a YAML
selects it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dualhead.backbones.config import VisionConfig
from dualhead.core.config import RunConfig
from dualhead.dense.data import DENSE_FORMATS


def _default_backbone() -> VisionConfig:
    # Batch statistics of dense batches (32 distinct images) are good: batch norm trains.
    return VisionConfig(name="efficientnet_lite0", weights="offline", norm_eval=False)


@dataclass
class MoEConfig:
    """``moe``: multi-gate mixture of experts after the shared FPN (`dualhead.mtl.architectures.routing`)."""

    experts: int = 4  # expert decoders (two conv-BN-ReLU blocks each), shared by every task
    hidden: int = 64  # channels of each expert's output, what the task heads read
    top_k: int | None = None  # route each sample to its k best experts per task; null: mix all


@dataclass
class HyperNetConfig:
    """``hypernet``: task heads whose output convolution a shared hypernetwork generates from a learned
    task embedding (`dualhead.mtl.architectures.hypernet`)."""

    embedding_dim: int = 32  # each task's embedding, its only head parameters besides its hidden block
    hidden: int = 64  # the hypernetwork's hidden width


@dataclass
class AdapterConfig:
    """``adapters``, ``lora``, ``adapters_shared_head``: per-task modules inside a backbone
    (`dualhead.dense.adapter_models`)."""

    # Freeze the backbone: only the tasks' adapters, pyramids and heads train (nothing trainable is
    # then shared by every task, except adapters_shared_head's shared head).
    freeze_backbone: bool = True
    reduction: int = 4  # adapters: bottleneck width = a block's channels // reduction
    rank: int = 4  # lora: rank r of each task's update B A
    alpha: float = 8.0  # lora: the update is scaled by alpha / r
    # A saved model or run directory of the same architecture and backbone: its backbone, tasks and
    # heads load and stay frozen; only the tasks it lacks train (adding a task to a trained model).
    init_from: str | None = None


@dataclass
class QueryDecoderConfig:
    """``task_queries``: a transformer decoder per task with its own learned queries over the shared
    encoder's tokens (`dualhead.dense.query_models`)."""

    # Queries of each set-prediction task (detection, keypoints): at least the most objects an image
    # holds (data.max_objects), since each object is matched to one query. Dense tasks get one query
    # per output channel.
    num_queries: int = 10
    layers: int = 2  # decoder layers per task
    heads: int = 4  # attention heads
    dim: int = 128  # token and query width (divisible by heads, and by 4 for the positional encoding)
    feedforward: int = 256  # hidden width of each decoder layer's MLP
    dropout: float = 0.0


@dataclass
class DenseModelConfig:
    """A multi-scale backbone, the shared architecture on top of it, and the task heads' width."""

    backbone: VisionConfig = field(default_factory=_default_backbone)
    # hard_fpn | mtan | multitask_fpn | cross_stitch | sluice | moe | hypernet | adapters | lora |
    # adapters_shared_head | task_queries (dualhead.dense.models.DENSE_ARCHITECTURES)
    architecture: str = "hard_fpn"
    out_indices: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # backbone levels (strides 4..32)
    fpn_dim: int = 64
    head_dim: int = 64
    # Options of one architecture each (the others ignore them):
    # multitask_fpn: the levels (positions in out_indices, 0 = finest) each task's head reads, e.g.
    # {depth: [2, 3]}; a task not named reads every level.
    task_levels: dict[str, list[int]] = field(default_factory=dict)
    # cross_stitch, sluice: the share of its own activations a column (sluice: a subspace) keeps when
    # the learned mixing starts; the rest comes evenly from the others (Misra et al.: 0.9).
    stitch_self_weight: float = 0.9
    # sluice: equal channel groups each level is split into, mixed across tasks separately.
    sluice_subspaces: int = 2
    # sluice: weight of the orthogonality penalty between a column's subspaces (Ruder et al.), an
    # auxiliary loss outside the balancing; 0 turns it off.
    sluice_orthogonality: float = 0.0
    # moe, hypernet: options of the routing and hypernetwork architectures (dualhead.dense.routing_models).
    moe: MoEConfig = field(default_factory=MoEConfig)
    hypernet: HyperNetConfig = field(default_factory=HyperNetConfig)
    # adapters, lora, adapters_shared_head (dualhead.dense.adapter_models).
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    # task_queries (dualhead.dense.query_models); it reads the last level of out_indices.
    queries: QueryDecoderConfig = field(default_factory=QueryDecoderConfig)


@dataclass
class DenseDataConfig:
    """Which dataset, where, which tasks, and how batches are drawn."""

    format: str = "scenes"  # scenes | nyuv2 | cityscapes (see dualhead.dense.data.DENSE_FORMATS)
    # scenes: the cache folder (default ~/.cache/dualhead/scenes); nyuv2 / cityscapes: the dataset
    # folder in LibMTL's preprocessed layout (<root>/{train,val}/{image,label,depth,normal}/<i>.npy).
    root: str | None = None
    # Tasks to learn, any of seg, depth, normals that the format labels; null: all of them. One task
    # makes a single-task baseline. The scenes also label detection and keypoints (per object, as
    # sets: architecture task_queries), learnt only when named here, e.g. [detection, keypoints].
    tasks: list[str] | None = None
    # Procedural scenes (format scenes): resolution, split sizes, generator seed and difficulty.
    image_size: int = 64
    train_size: int = 4000
    val_size: int = 500
    test_size: int = 500
    max_objects: int = 6
    noise: float = 0.04
    # nyuv2 / cityscapes: their val/ folder is the test split (the official test images); validation
    # is this fraction of train/.
    val_fraction: float = 0.1
    # The data's own seed (the scenes generator, the validation draw), apart from train.seed so that
    # runs over training seeds see the same data.
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0

    @property
    def num_classes(self) -> int:
        """Segmentation classes of the format (scenes: background and five shapes)."""
        return DENSE_FORMATS.lookup(self.format).num_classes


@dataclass
class ScenesRunConfig(RunConfig):
    """A dense-vision run: ``application: scenes``."""

    application: str = "scenes"
    model: DenseModelConfig = field(default_factory=DenseModelConfig)
    data: DenseDataConfig = field(default_factory=DenseDataConfig)
