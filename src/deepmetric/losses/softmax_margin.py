"""Classification losses with normalised or margin-modified softmax logits.

NormalizedSoftmax (NormFace; Wang et al., 2017), LargeMarginSoftmax (L-softmax; Liu et al., 2016),
SphereFace (A-softmax; Liu et al., 2017), CosFace (AM-softmax; Wang et al., 2018), ArcFace (Deng et
al., 2019) and SubCenterArcFace (Deng et al., 2020).

Each loss owns a classifier matrix ``W`` of shape ``(embedding_size, num_classes)`` (PML's name and
shape, so PML state dicts load with ``strict=True``), computes ``(B, C)`` logits from the cosine
between the embeddings and the columns of ``W``, replaces every sample's *target* logit (the one of
its own class) by a margin-penalised value, scales, and applies cross-entropy per sample.
The formulas are in :mod:`deepmetric.functional`
(:func:`~deepmetric.functional.normalized_softmax_losses`,
:func:`~deepmetric.functional.margin_softmax_losses` and the target margins); each class calls one.

The margin-based losses derive from :class:`LargeMarginSoftmaxLoss`, as in PML: a subclass changes
:meth:`~LargeMarginSoftmaxLoss.modify_cosine_of_target_classes` (the margin) and
:meth:`~LargeMarginSoftmaxLoss.scale_logits` (the scale). Logits are always computed in float32
or wider with autocast off, and ``W`` is never cast in place (see :mod:`.proxy`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from typing_extensions import Unpack

from .._checks import check_embeddings, check_labels, check_positive_int
from ..distances import BaseDistance, CosineSimilarity, DotProductSimilarity
from ..functional import (
    additive_angular_margin,
    additive_cosine_margin,
    large_margin_target,
    margin_softmax_losses,
    normalized_softmax_logits,
    normalized_softmax_losses,
)
from ..pairwise import matrix_to_unit_reference
from ..reducers import LossDict, row_entry
from .base import Batch
from .proxy import (
    ClassWeightLoss,
    WeightLossOptions,
    check_class_labels,
    compute_dtype,
    full_precision,
    miner_weights,
)

# -- NormFace -------------------------------------------------------------------------------------


class NormalizedSoftmaxLoss(ClassWeightLoss):
    """Softmax over the similarities to L2-normalised class weights, divided by a temperature.

    Wang, Xiang, Cheng & Yuille, "NormFace: L2 Hypersphere Embedding for Face Verification", 2017.
    Logits are ``sim(x_i, W_j / |W_j|) / temperature`` (``-dist / temperature`` for a distance).
    Defaults as in PML: ``temperature=0.05``, ``DotProductSimilarity`` *with* normalised
    embeddings (PML's default for that class), ``W`` initialised by ``normal_``, ``MeanReducer``.
    With a miner, each sample is weighted by how often it appears in the miner's tuple.

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` in ``[0, num_classes)`` -> scalar;
    parameter ``W``: ``(embedding_size, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        temperature: float = 0.05,
        **options: Unpack[WeightLossOptions],
    ) -> None:
        super().__init__(num_classes, embedding_size, **options)
        self.temperature = temperature
        self.W = self.new_weight(embedding_size, num_classes)

    def get_default_distance(self) -> BaseDistance:
        return DotProductSimilarity(normalize_embeddings=True)

    def compute_loss(self, batch: Batch) -> LossDict:
        labels = self.class_labels(batch)
        with full_precision(batch.embeddings.device):
            emb = batch.embeddings.to(compute_dtype(batch.embeddings, self.W))
            weights = miner_weights(batch.indices_tuple, len(emb), emb.dtype, emb.device)
            sims = self._similarities(emb)
            losses = normalized_softmax_losses(
                sims, labels, self.temperature, self.distance, weights
            )
            loss_dict: LossDict = {"loss": row_entry(losses)}
            self.add_weight_regularization(loss_dict, self.W.to(emb.dtype).t())
        return loss_dict

    def _similarities(self, emb: Tensor) -> Tensor:
        """``(B, C)`` similarities (or distances) of embeddings already validated (with the
        batch, or by :meth:`get_logits`) to the L2-normalised class weights."""
        normalized_w = self.distance.normalize(self.W.to(emb.dtype), dim=0)
        return matrix_to_unit_reference(self.distance, emb, normalized_w).to(emb.dtype)

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``(B, embedding_size)`` -> ``(B, num_classes)`` logits, as PML's ``get_logits``."""
        check_embeddings(embeddings, "embeddings")
        with full_precision(embeddings.device):
            sims = self._similarities(embeddings.to(compute_dtype(embeddings, self.W)))
            return normalized_softmax_logits(sims, self.temperature, self.distance)


# -- L-softmax and its descendants ----------------------------------------------------------------


class LargeMarginSoftmaxLoss(ClassWeightLoss):
    """Softmax whose target logit uses the angle multiplied by an integer margin.

    Liu, Wen, Yu & Yang, "Large-Margin Softmax Loss for Convolutional Neural Networks", 2016.
    With ``θ_ij`` the angle between ``x_i`` and ``W_j``, logits are
    ``|x_i| |W_j| cos θ_ij * scale``, except the target, where ``cos θ`` becomes
    ``ψ(θ) = (-1)^k cos(m θ) - 2k`` (:func:`large_margin_target`). Defaults as in PML:
    ``margin=4`` (truncated to an int, at least 1), ``scale=1``, ``W`` initialised by ``normal_``,
    ``MeanReducer``; the distance must be ``CosineSimilarity``. With a miner, each sample is
    weighted by how often it appears in the miner's tuple.

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` in ``[0, num_classes)`` -> scalar;
    parameter ``W``: ``(embedding_size, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 4,
        scale: float = 1,
        **options: Unpack[WeightLossOptions],
    ) -> None:
        super().__init__(num_classes, embedding_size, **options)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                f"{type(self).__name__} requires distance=CosineSimilarity(), got "
                f"{type(self.distance).__name__}"
            )
        self.margin = margin
        self.scale = scale
        self.init_margin()
        self.W = self.new_weight(embedding_size, num_classes)

    def init_margin(self) -> None:
        """Turn the ``margin`` argument into the form the target logit uses (here: an int)."""
        margin = int(self.margin)
        if margin < 1:
            raise ValueError(f"margin must be at least 1 for {type(self).__name__}, got {margin}")
        self.margin = margin

    def get_cosine(self, embeddings: Tensor) -> Tensor:
        """``(B, D)`` -> ``(B, num_classes)`` cosines between the embeddings and the classes."""
        return self.distance(embeddings, self.W.to(embeddings.dtype).t()).to(embeddings.dtype)

    def modify_cosine_of_target_classes(self, cosine_of_target_classes: Tensor) -> Tensor:
        """``(B,)`` target cosines -> ``(B,)`` margin-penalised target logits (before scaling)."""
        return large_margin_target(cosine_of_target_classes, int(self.margin))

    def scale_logits(self, logits: Tensor, embeddings: Tensor) -> Tensor:
        """Multiply the ``(B, C)`` logits by ``|x_i| |W_j| * scale``."""
        embedding_norms = self.distance.get_norm(embeddings)
        weight_norms = self.distance.get_norm(self.W.to(embeddings.dtype), dim=0)
        return logits * (embedding_norms.unsqueeze(1) * weight_norms.unsqueeze(0)) * self.scale

    def compute_loss(self, batch: Batch) -> LossDict:
        labels = self.class_labels(batch)
        with full_precision(batch.embeddings.device):
            emb = batch.embeddings.to(compute_dtype(batch.embeddings, self.W))
            weights = miner_weights(batch.indices_tuple, len(emb), emb.dtype, emb.device)
            losses = margin_softmax_losses(
                self.get_cosine(emb),
                labels,
                self.modify_cosine_of_target_classes,
                lambda logits: self.scale_logits(logits, emb),
                weights,
            )
            loss_dict: LossDict = {"loss": row_entry(losses)}
            self.add_weight_regularization(loss_dict, self.W.to(emb.dtype).t())
        return loss_dict

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``(B, embedding_size)`` -> ``(B, num_classes)`` scaled logits without the margin, as
        PML's ``get_logits`` (for inference)."""
        with full_precision(embeddings.device):
            emb = embeddings.to(compute_dtype(embeddings, self.W))
            return self.scale_logits(self.get_cosine(emb), emb)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, scale={self.scale}"


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """L-softmax with normalised class weights: logits ``|x_i| cos θ_ij * scale``.

    Liu, Wen, Yu, Li, Raj & Song, "SphereFace: Deep Hypersphere Embedding for Face Recognition"
    (A-softmax), 2017. Arguments and defaults as :class:`LargeMarginSoftmaxLoss` (``margin=4``,
    ``scale=1``).

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` -> scalar; ``W``:
    ``(embedding_size, num_classes)``.
    """

    def scale_logits(self, logits: Tensor, embeddings: Tensor) -> Tensor:
        embedding_norms = torch.linalg.vector_norm(embeddings, ord=2, dim=1)
        return logits * embedding_norms.unsqueeze(1) * self.scale


class CosFaceLoss(LargeMarginSoftmaxLoss):
    """Additive cosine margin: target logit ``cos θ - margin``, all logits times ``scale``.

    Wang, Wang, Zhou, Ji, Gong, Zhou, Li & Liu, "CosFace: Large Margin Cosine Loss for Deep Face
    Recognition", 2018 (also AM-softmax, Wang et al. 2018). Defaults as in PML: ``margin=0.35``,
    ``scale=64``.

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` -> scalar; ``W``:
    ``(embedding_size, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.35,
        scale: float = 64,
        **options: Unpack[WeightLossOptions],
    ) -> None:
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **options)

    def init_margin(self) -> None:
        pass

    def modify_cosine_of_target_classes(self, cosine_of_target_classes: Tensor) -> Tensor:
        return additive_cosine_margin(cosine_of_target_classes, self.margin)

    def scale_logits(self, logits: Tensor, embeddings: Tensor) -> Tensor:
        return logits * self.scale


class ArcFaceLoss(LargeMarginSoftmaxLoss):
    """Additive angular margin: target logit ``cos(θ + margin)``, all logits times ``scale``.

    Deng, Guo, Xue & Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", 2019. Defaults as in PML: ``margin=28.6`` *degrees* (stored in ``self.margin``
    in radians, as PML does), ``scale=64``. Past ``θ = π - margin`` the target logit is
    ``cos θ - margin * sin(margin)`` (see :func:`additive_angular_margin`, which also explains
    why the gradient stays finite at ``θ = 0`` and ``θ = π``).

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` -> scalar; ``W``:
    ``(embedding_size, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64,
        **options: Unpack[WeightLossOptions],
    ) -> None:
        super().__init__(num_classes, embedding_size, margin=margin, scale=scale, **options)

    def init_margin(self) -> None:
        self.margin = math.radians(self.margin)

    def modify_cosine_of_target_classes(self, cosine_of_target_classes: Tensor) -> Tensor:
        return additive_angular_margin(cosine_of_target_classes, self.margin)

    def scale_logits(self, logits: Tensor, embeddings: Tensor) -> Tensor:
        return logits * self.scale


class SubCenterArcFaceLoss(ArcFaceLoss):
    """ArcFace with ``sub_centers`` weight vectors per class; a class's cosine is the largest.

    Deng, Guo, Liu, Cao & Zafeiriou, "Sub-center ArcFace: Boosting Face Recognition by
    Large-scale Noisy Web Faces", 2020. Defaults as in PML: ``margin=28.6`` degrees,
    ``scale=64``, ``sub_centers=3``. :meth:`get_outliers` finds the samples far from their class's
    dominant sub-center.

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` -> scalar; ``W``:
    ``(embedding_size, num_classes * sub_centers)``, the sub-centers of class ``j`` in columns
    ``j * sub_centers`` to ``(j + 1) * sub_centers - 1``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64,
        sub_centers: int = 3,
        **options: Unpack[WeightLossOptions],
    ) -> None:
        check_positive_int(sub_centers, "sub_centers")
        # As in PML: build ArcFace over num_classes * sub_centers columns, then record the
        # number of actual classes (which the labels index).
        super().__init__(
            num_classes * sub_centers, embedding_size, margin=margin, scale=scale, **options
        )
        self.sub_centers = sub_centers
        self.num_classes = num_classes

    def get_cosine(self, embeddings: Tensor) -> Tensor:
        all_cosines = super().get_cosine(embeddings)  # (B, C * K)
        per_center = all_cosines.view(-1, self.num_classes, self.sub_centers)
        return per_center.max(dim=2).values

    def get_outliers(
        self,
        embeddings: Tensor,
        labels: Tensor,
        threshold: float = 75,
        return_dominant_centers: bool = True,
    ) -> tuple[Tensor, Tensor] | Tensor:
        """Samples whose angle to their class's dominant sub-center exceeds ``threshold`` degrees.

        A class's dominant sub-center is the one nearest to most of its samples (ties: the lowest
        index). Returns the ``(n_outliers,)`` int64 indices of the outliers, ordered by label
        then index, and, if ``return_dominant_centers``, the ``(embedding_size, num_classes)``
        dominant sub-centers (zero columns for classes absent from the batch).
        """
        check_embeddings(embeddings)
        labels = check_labels(labels, embeddings)
        check_class_labels(labels, self.num_classes)
        n_classes, n_centers = self.num_classes, self.sub_centers
        with torch.no_grad(), full_precision(embeddings.device):
            emb = embeddings.to(compute_dtype(embeddings, self.W))
            weight = self.W.to(emb.dtype)
            all_cosines = self.distance(emb, weight.t()).to(emb.dtype)
            own = all_cosines.view(-1, n_classes, n_centers)[torch.arange(len(emb)), labels]
            nearest = own.argmax(dim=1)  # (B,): each sample's nearest own sub-center
            votes = torch.zeros(n_classes, n_centers, dtype=torch.long, device=emb.device)
            votes.index_put_((labels, nearest), torch.ones_like(labels), accumulate=True)
            dominant = votes.argmax(dim=1)  # (C,)
            dominant_cos = own.gather(1, dominant[labels].unsqueeze(1)).squeeze(1)
            is_outlier = dominant_cos < math.cos(math.radians(threshold))
            by_label = torch.argsort(labels, stable=True)
            outliers = by_label[is_outlier[by_label]]
            present = votes.sum(dim=1) > 0
            centers = weight.view(-1, n_classes, n_centers)[:, torch.arange(n_classes), dominant]
            centers = centers * present
        return (outliers, centers) if return_dominant_centers else outliers

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sub_centers={self.sub_centers}"
