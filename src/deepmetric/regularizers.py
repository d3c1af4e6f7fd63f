"""Regularizers: penalties on a set of vectors, passed to a loss as ``embedding_regularizer=``
(on the batch's embeddings) or ``weight_regularizer=`` (on a classification loss's
``(num_classes, embedding_size)`` class weights), PML's convention.

Each is a :class:`BaseRegularizer`: ``compute_loss`` returns the per-vector penalties as one
loss-dict entry, and the regularizer's reducer reduces them (mean by default).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_embeddings, check_positive_int
from .distances import BaseDistance, CosineSimilarity, LpDistance, _to_float32
from .reducers import BaseReducer, DivisorReducer, LossInfo, MeanReducer, row_entry


class BaseRegularizer(nn.Module):
    """``regularizer(x)``: ``(N, D)`` vectors -> a scalar, ``reducer`` applied to the entry of
    :meth:`compute_loss`. ``distance`` (default :meth:`get_default_distance`) is the one the
    penalty is measured with, for the regularizers that compare vectors."""

    def __init__(
        self, reducer: BaseReducer | None = None, distance: BaseDistance | None = None
    ) -> None:
        super().__init__()
        self.reducer = self.get_default_reducer() if reducer is None else reducer
        self.distance = self.get_default_distance() if distance is None else distance

    def get_default_reducer(self) -> BaseReducer:
        return MeanReducer()

    def get_default_distance(self) -> BaseDistance:
        return LpDistance()

    def compute_loss(self, x: Tensor) -> LossInfo:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``(N, D)`` -> scalar."""
        check_embeddings(x, "the regularized vectors")
        result: Tensor = self.reducer({"loss": self.compute_loss(x)}, x)
        return result


class LpRegularizer(BaseRegularizer):
    """Penalise the L``p`` norm of each vector, raised to ``power``.

    ``loss(..., embedding_regularizer=LpRegularizer(), embedding_reg_weight=w)`` adds
    ``w * mean_i ||x_i||_p`` to the loss. Arguments and defaults as in PML.
    """

    def __init__(
        self,
        p: float = 2,
        power: float = 1,
        reducer: BaseReducer | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(reducer, distance)
        self.p = p
        self.power = power

    def compute_loss(self, x: Tensor) -> LossInfo:
        # half precision in float32; float64 stays float64
        norms = torch.linalg.vector_norm(_to_float32(x), ord=self.p, dim=1)
        return row_entry(norms if self.power == 1 else norms**self.power)


class ZeroMeanRegularizer(BaseRegularizer):
    """Penalise ``|Σ_d x_d|``, each vector's sum over its dimensions: pushes every vector's
    mean to zero, as PML's ``ZeroMeanRegularizer`` (for the SNR distance: Yuan, Chen, Zhang &
    Tian, "Signal-To-Noise Ratio: A Robust Distance Metric for Deep Metric Learning", 2019).

    Shapes: ``(N, D)`` -> scalar.
    """

    def compute_loss(self, x: Tensor) -> LossInfo:
        return row_entry(x.sum(dim=1).abs())


class CenterInvariantRegularizer(BaseRegularizer):
    """Penalise the spread of the class weights' squared norms:
    ``(|w_c|² - mean_k |w_k|²)² / 4`` for each class.

    Wu, Liu, Yang, Yan & Li, "Deep Face Recognition with Center Invariant Loss", ACM MM
    Workshops 2017. For a classification loss's ``weight_regularizer``. The distance must be an
    :class:`~deepmetric.distances.LpDistance` with ``power=1`` and no normalisation (its ``p``
    is the norm), as in PML.

    Shapes: weights ``(C, D)`` -> scalar.
    """

    def __init__(
        self, reducer: BaseReducer | None = None, distance: BaseDistance | None = None
    ) -> None:
        super().__init__(reducer, distance)
        d = self.distance
        if not (isinstance(d, LpDistance) and d.power == 1 and not d.normalize_embeddings):
            raise ValueError(
                "CenterInvariantRegularizer needs LpDistance(power=1, normalize_embeddings="
                f"False), got {d!r}"
            )

    def get_default_distance(self) -> BaseDistance:
        return LpDistance(power=1, normalize_embeddings=False)

    def compute_loss(self, x: Tensor) -> LossInfo:
        squared_norms = self.distance.get_norm(x) ** 2
        return row_entry((squared_norms - squared_norms.mean()) ** 2 / 4)


class RegularFaceRegularizer(BaseRegularizer):
    """Penalise each class weight's similarity to its most similar other class weight.

    Zhao, Wu, Bai, Lin & Li, "RegularFace: Deep Face Recognition via Exclusive Regularization",
    CVPR 2019. For a classification loss's ``weight_regularizer``; the distance must be a
    similarity (default ``CosineSimilarity``), as in PML.

    Shapes: weights ``(C, D)`` -> scalar.
    """

    def __init__(
        self, reducer: BaseReducer | None = None, distance: BaseDistance | None = None
    ) -> None:
        super().__init__(reducer, distance)
        if not self.distance.is_inverted:
            raise ValueError(
                "RegularFaceRegularizer needs a similarity (e.g. CosineSimilarity), got "
                f"{type(self.distance).__name__}"
            )

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, x: Tensor) -> LossInfo:
        sims = self.distance(x)
        others = sims.detach().clone().fill_diagonal_(float("-inf"))
        nearest = others.argmax(dim=1, keepdim=True)
        return row_entry(sims.gather(1, nearest).squeeze(1))


class SparseCentersRegularizer(BaseRegularizer):
    """Pull together the centres of each class: ``sqrt(2 - 2 cos)`` between every two centres
    of a class, summed and divided by twice the number of such pairs.

    Qian, Shang, Sun, Hu, Li & Jin, "SoftTriple Loss: Deep Metric Learning Without Triplet
    Sampling", ICCV 2019 (the regularizer of its centres). For the ``(num_classes ·
    centers_per_class, D)`` weights of a loss with several centres per class, class ``c``'s
    centres in rows ``c·K .. c·K + K - 1``. Arguments and defaults as in PML:
    ``CosineSimilarity`` (the only distance it takes), ``DivisorReducer``.

    Shapes: weights ``(num_classes · centers_per_class, D)`` -> scalar.
    """

    def __init__(
        self,
        num_classes: int,
        centers_per_class: int,
        reducer: BaseReducer | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(reducer, distance)
        check_positive_int(num_classes, "num_classes")
        check_positive_int(centers_per_class, "centers_per_class", minimum=2)
        if not isinstance(self.distance, CosineSimilarity):
            raise ValueError(
                "SparseCentersRegularizer needs a CosineSimilarity, got "
                f"{type(self.distance).__name__}"
            )
        self.num_classes = num_classes
        self.centers_per_class = centers_per_class

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def get_default_reducer(self) -> BaseReducer:
        return DivisorReducer()

    def compute_loss(self, x: Tensor) -> LossInfo:
        n_centers = self.num_classes * self.centers_per_class
        if len(x) != n_centers:
            raise ValueError(
                f"SparseCentersRegularizer expects {self.num_classes} x {self.centers_per_class}"
                f" = {n_centers} centres, got {len(x)}"
            )
        # each pair of centres of one class once: the upper triangle of each class's block
        centre_class = torch.arange(n_centers, device=x.device) // self.centers_per_class
        first, second = torch.triu_indices(n_centers, n_centers, offset=1, device=x.device)
        same = centre_class[first] == centre_class[second]
        first, second = first[same], second[same]
        sims = self.distance(x)[first, second]
        tiny = torch.finfo(sims.dtype).tiny
        losses = torch.sqrt(2.0 + tiny - (2.0 * sims).clamp(max=2))
        entry = row_entry(losses)
        entry["divisor"] = 2 * len(losses)
        return entry
