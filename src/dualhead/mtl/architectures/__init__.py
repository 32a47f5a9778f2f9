"""Multi-task architecture building blocks, independent of any application.

Each block says which of its modules every task shares and which belong to one task; an
application's architecture (e.g. `dualhead.dense.architectures`) puts a backbone, a block, and its
task decoders and heads together and declares that split through `MultiTaskModel`.
"""

from dualhead.mtl.architectures.adapters import (
    BottleneckAdapter,
    TaskAdapters,
    TaskFiLM,
    TaskHooks,
    TaskVector,
    backbone_blocks,
)
from dualhead.mtl.architectures.cross_stitch import (
    ColumnNetwork,
    CrossStitchNetwork,
    CrossStitchUnit,
    mixing_init,
)
from dualhead.mtl.architectures.hypernet import ConvHyperNetwork, TaskEmbedding
from dualhead.mtl.architectures.lora import LoRADelta, TaskLoRA, linear_layers
from dualhead.mtl.architectures.mtan import MTAN, AttentionMask, TaskAttention
from dualhead.mtl.architectures.multitask_fpn import MultiTaskPyramid, TaskPyramid
from dualhead.mtl.architectures.pyramid import FeaturePyramid, TopDownPyramid, conv_bn_relu, resize_sum
from dualhead.mtl.architectures.queries import (
    QueryDecoder,
    SetHead,
    TaskQueryDecoders,
    sine_position_encoding,
)
from dualhead.mtl.architectures.representation import pack_levels
from dualhead.mtl.architectures.routing import ExpertGate, MultiGateExperts
from dualhead.mtl.architectures.sluice import LayerSelection, SluiceNetwork, SluiceUnit
from dualhead.mtl.architectures.stages import BackboneStages, split_into_stages

__all__ = [
    "BottleneckAdapter",
    "LoRADelta",
    "TaskAdapters",
    "TaskFiLM",
    "TaskHooks",
    "TaskLoRA",
    "TaskVector",
    "backbone_blocks",
    "linear_layers",
    "ConvHyperNetwork",
    "ExpertGate",
    "MultiGateExperts",
    "TaskEmbedding",
    "MTAN",
    "AttentionMask",
    "BackboneStages",
    "ColumnNetwork",
    "CrossStitchNetwork",
    "CrossStitchUnit",
    "FeaturePyramid",
    "LayerSelection",
    "MultiTaskPyramid",
    "SluiceNetwork",
    "SluiceUnit",
    "TaskAttention",
    "TaskPyramid",
    "TopDownPyramid",
    "conv_bn_relu",
    "mixing_init",
    "pack_levels",
    "QueryDecoder",
    "SetHead",
    "TaskQueryDecoders",
    "sine_position_encoding",
    "resize_sum",
    "split_into_stages",
]
