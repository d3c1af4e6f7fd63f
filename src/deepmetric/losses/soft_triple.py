"""SoftTriple loss (Qian, Shang, Sun, Hu, Li & Jin, 2019): several learnable centres per class."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn
from typing_extensions import Unpack

from .._checks import check_embeddings, check_positive_int
from ..distances import BaseDistance, CosineSimilarity
from ..functional import soft_triple_class_similarities, soft_triple_losses
from ..reducers import LossDict, row_entry
from .base import Batch
from .proxy import (
    ClassWeightLoss,
    WeightLossOptions,
    compute_dtype,
    full_precision,
    miner_weights,
)


def _kaiming_uniform_init(weight: Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class SoftTripleLoss(ClassWeightLoss):
    """A softmax over the classes, each class's similarity a soft maximum over its centres.

    Qian, Shang, Sun, Hu, Li & Jin, "SoftTriple Loss: Deep Metric Learning Without Triplet
    Sampling", ICCV 2019 (the formulas: :func:`~deepmetric.functional.soft_triple_losses`,
    :func:`~deepmetric.functional.soft_triple_class_similarities`). Arguments and defaults as in
    PML: ``centers_per_class=10``, ``la=20`` (the scale λ), ``gamma=0.1`` (the centres' softmax
    temperature γ), ``margin=0.01``, ``CosineSimilarity`` (a similarity is required), the
    centres ``fc`` initialised by ``kaiming_uniform_(a=√5)``, ``MeanReducer``. The paper
    regularises the centres with :class:`~deepmetric.regularizers.SparseCentersRegularizer`
    (``weight_regularizer=``). With a miner, each sample is weighted by how often it appears in
    the miner's tuple.

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` in ``[0, num_classes)`` -> scalar;
    parameter ``fc``: ``(embedding_size, num_classes · centers_per_class)``, class ``c``'s
    centres in columns ``c·K .. c·K + K - 1``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        centers_per_class: int = 10,
        la: float = 20,
        gamma: float = 0.1,
        margin: float = 0.01,
        **options: Unpack[WeightLossOptions],
    ) -> None:
        super().__init__(num_classes, embedding_size, **options)
        if not self.distance.is_inverted:
            raise ValueError(
                f"SoftTripleLoss needs a similarity, got {type(self.distance).__name__}"
            )
        check_positive_int(centers_per_class, "centers_per_class")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.centers_per_class = centers_per_class
        self.la = la
        self.gamma = gamma
        self.margin = margin
        self.fc = self.new_weight(embedding_size, num_classes * centers_per_class)

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def get_default_weight_init_func(self) -> Callable[[Tensor], object]:
        return _kaiming_uniform_init

    def compute_loss(self, batch: Batch) -> LossDict:
        labels = self.class_labels(batch)
        with full_precision(batch.embeddings.device):
            emb = batch.embeddings.to(compute_dtype(batch.embeddings, self.fc))
            weights = miner_weights(batch.indices_tuple, len(emb), emb.dtype, emb.device)
            class_sims = self._class_similarities(emb)
            losses = soft_triple_losses(class_sims, labels, self.la, self.margin, weights)
            loss_dict: LossDict = {"loss": row_entry(losses)}
            self.add_weight_regularization(loss_dict, self.fc.to(emb.dtype).t())
        return loss_dict

    def _class_similarities(self, emb: Tensor) -> Tensor:
        sims = self.distance(emb, self.fc.to(emb.dtype).t())
        return soft_triple_class_similarities(sims, self.centers_per_class, self.gamma)

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``(B, embedding_size)`` -> ``(B, num_classes)`` class similarities, as PML's
        ``get_logits``."""
        check_embeddings(embeddings, "embeddings")
        with full_precision(embeddings.device):
            return self._class_similarities(embeddings.to(compute_dtype(embeddings, self.fc)))
