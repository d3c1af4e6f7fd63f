"""Metric-learning losses. Every loss is called as
``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``."""

from .base import BaseMetricLossFunction
from .contrastive import ContrastiveLoss
from .lifted import GeneralizedLiftedStructureLoss, LiftedStructureLoss
from .npairs import NPairsLoss
from .ntxent import NTXentLoss
from .triplet import TripletMarginLoss

__all__ = [
    "BaseMetricLossFunction",
    "ContrastiveLoss",
    "GeneralizedLiftedStructureLoss",
    "LiftedStructureLoss",
    "NPairsLoss",
    "NTXentLoss",
    "TripletMarginLoss",
]
