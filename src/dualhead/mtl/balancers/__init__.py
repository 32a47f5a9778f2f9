"""Loss weighting and gradient aggregation behind one interface (`Balancer.backward`).

Importing the package registers every method in `BALANCERS`; build one with `build_balancer`.
"""

from dualhead.mtl.balancers.aggregation import AGGREGATORS, JacobianAggregation, NormalizedSumWeighting
from dualhead.mtl.balancers.base import BALANCERS, Balancer, BalanceReport, FixedWeights, build_balancer
from dualhead.mtl.balancers.dbmtl import DBMTL
from dualhead.mtl.balancers.gradnorm import GradNorm
from dualhead.mtl.balancers.weighting import (
    FAMO,
    DynamicWeightAverage,
    GeometricLoss,
    IMTLLossWeighting,
    LossWeighting,
    RandomLossWeighting,
    SmoothTchebycheff,
    UncertaintyWeighting,
)

__all__ = [
    "AGGREGATORS",
    "BALANCERS",
    "DBMTL",
    "FAMO",
    "BalanceReport",
    "Balancer",
    "DynamicWeightAverage",
    "FixedWeights",
    "GeometricLoss",
    "GradNorm",
    "IMTLLossWeighting",
    "JacobianAggregation",
    "LossWeighting",
    "NormalizedSumWeighting",
    "RandomLossWeighting",
    "SmoothTchebycheff",
    "UncertaintyWeighting",
    "build_balancer",
]
