"""Metric-learning losses. Every loss is called as
``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``."""

from .base import BaseMetricLossFunction
from .circle import CircleLoss
from .contrastive import ContrastiveLoss, SignalToNoiseRatioContrastiveLoss
from .cross_batch_memory import CrossBatchMemory
from .lifted import GeneralizedLiftedStructureLoss, LiftedStructureLoss
from .margin import MarginLoss
from .multi_similarity import MultiSimilarityLoss
from .nca import NCALoss
from .npairs import NPairsLoss
from .ntxent import NTXentLoss
from .proxy import ProxyAnchorLoss, ProxyNCALoss
from .ranked_list import RankedListLoss
from .soft_triple import SoftTripleLoss
from .softmax_margin import (
    ArcFaceLoss,
    CosFaceLoss,
    LargeMarginSoftmaxLoss,
    NormalizedSoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
)
from .supervised_contrastive import SupConLoss
from .triplet import TripletMarginLoss
from .tuplet_margin import TupletMarginLoss
from .tuplet_npairs import TupletNPairsLoss
from .wrappers import MultipleLosses, SelfSupervisedLoss

__all__ = [
    "ArcFaceLoss",
    "BaseMetricLossFunction",
    "CircleLoss",
    "CosFaceLoss",
    "CrossBatchMemory",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "RankedListLoss",
    "SoftTripleLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "ContrastiveLoss",
    "GeneralizedLiftedStructureLoss",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "MultipleLosses",
    "NCALoss",
    "NPairsLoss",
    "NTXentLoss",
    "SelfSupervisedLoss",
    "SignalToNoiseRatioContrastiveLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "TupletMarginLoss",
    "TupletNPairsLoss",
]
