"""Metric-learning losses. Every loss is called as
``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``."""

from .base import BaseMetricLossFunction
from .contrastive import ContrastiveLoss
from .lifted import GeneralizedLiftedStructureLoss, LiftedStructureLoss
from .npairs import NPairsLoss
from .ntxent import NTXentLoss
from .proxy import ProxyAnchorLoss, ProxyNCALoss
from .softmax_margin import (
    ArcFaceLoss,
    CosFaceLoss,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from .triplet import TripletMarginLoss

__all__ = [
    "ArcFaceLoss",
    "BaseMetricLossFunction",
    "CosFaceLoss",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "ContrastiveLoss",
    "GeneralizedLiftedStructureLoss",
    "LiftedStructureLoss",
    "NPairsLoss",
    "NTXentLoss",
    "TripletMarginLoss",
]
