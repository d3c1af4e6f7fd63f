"""Pairwise distances and similarities: the one B×R matrix that every loss and miner reads.

The classes keep pytorch-metric-learning's names, arguments and defaults, so
``distance=LpDistance(p=2, power=1)`` means the same thing in both libraries. Differences that
matter in practice:

* A Euclidean matrix is one matrix product (``|q|² + |r|² - 2 q·rᵀ``), and the gradient of the
  distance between two *equal* embeddings is zero instead of ``inf``/``NaN``.
* Half-precision input (float16 / bfloat16, also under ``torch.autocast``) is computed and
  returned in float32, so the matrix neither overflows nor rounds a small margin to the wrong sign.
  Gradients still flow back to the half-precision embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_embeddings

_HALF = (torch.float16, torch.bfloat16)


def _to_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _HALF else x


def _safe_sqrt(squared: Tensor) -> Tensor:
    """``sqrt`` whose gradient at 0 is 0 rather than ``inf`` (equal embeddings)."""
    squared = squared.clamp_min(0)
    is_zero = squared == 0
    return torch.sqrt(squared.masked_fill(is_zero, 1.0)).masked_fill(is_zero, 0.0)


# F.normalize's floor on the norm: a zero row stays zero
_NORM_EPS = 1e-12


def unit_rows(x: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """``x / max(||x||, eps)`` along ``dim`` (the value of ``F.normalize``) and the clamped
    norm, for :func:`unit_rows_grad`. No autograd of its own: for hand-written backwards."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min_(_NORM_EPS)
    return x / norm, norm


def unit_rows_grad(grad: Tensor, y: Tensor, norm: Tensor, dim: int = 1) -> Tensor:
    """The gradient through :func:`unit_rows` of ``grad`` (with respect to its output ``y``):
    ``(g - y (g · y)) / ||x||``, or ``g / eps`` where the norm was clamped (a constant norm has
    no radial part). Made of differentiable operations, so second derivatives work."""
    along = (grad * y).sum(dim=dim, keepdim=True)
    along = torch.where(norm <= _NORM_EPS, 0.0, along)
    return (grad - y * along) / norm


class _L2Normalize(torch.autograd.Function):
    """:func:`unit_rows` with its hand-written backward :func:`unit_rows_grad`: two passes over
    the rows instead of autograd's five operations through the division, the clamp and the norm
    (measured 175 -> 100 us forward and backward at 256 x 128 on CPU)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, dim: int) -> Tensor:
        y, _ = unit_rows(x, dim)
        ctx.save_for_backward(x, y)
        ctx.dim = dim  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        x, y = ctx.saved_tensors  # type: ignore[attr-defined]
        dim: int = ctx.dim  # type: ignore[attr-defined]
        # the norm recomputed from x, so that a second derivative sees it depend on x
        norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(_NORM_EPS)
        return unit_rows_grad(grad, y, norm, dim), None


def l2_normalize(x: Tensor, dim: int = 1) -> Tensor:
    """``F.normalize(x, p=2, dim=dim)`` (same values and gradients), with a cheaper backward."""
    result = _L2Normalize.apply(x, dim)
    assert isinstance(result, Tensor)
    return result


class BaseDistance(nn.Module):
    """Base class: ``distance(query, ref=None)`` returns the ``(Nq, Nr)`` matrix.

    Args:
        normalize_embeddings: L``p``-normalise the rows before computing the matrix.
        p: the norm used for normalisation (and for :class:`LpDistance`, the distance).
        power: raise every entry of the matrix to this power.
        is_inverted: ``True`` for similarities (larger means closer).
    """

    def __init__(
        self,
        normalize_embeddings: bool = True,
        p: float = 2,
        power: float = 1,
        is_inverted: bool = False,
    ) -> None:
        super().__init__()
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power
        self.is_inverted = is_inverted

    def forward(self, query_emb: Tensor, ref_emb: Tensor | None = None) -> Tensor:
        """``(Nq, D)`` and optional ``(Nr, D)`` -> ``(Nq, Nr)``; no ``ref_emb``: the queries."""
        check_embeddings(query_emb, "query_emb")
        if ref_emb is not None:
            check_embeddings(ref_emb, "ref_emb")
            if ref_emb.shape[1] != query_emb.shape[1]:
                raise ValueError(
                    f"query_emb has dimension {query_emb.shape[1]} but ref_emb has "
                    f"{ref_emb.shape[1]}"
                )
        with torch.autocast(query_emb.device.type, enabled=False):
            query = self.maybe_normalize(_to_float32(query_emb))
            ref = query if ref_emb is None else self.maybe_normalize(_to_float32(ref_emb))
            return self.compute_powered_mat(query, ref)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        """Row-wise distance between two ``(N, D)`` tensors -> ``(N,)``, with normalisation and
        power applied as in :meth:`forward`."""
        with torch.autocast(query_emb.device.type, enabled=False):
            query = self.maybe_normalize(_to_float32(query_emb))
            ref = self.maybe_normalize(_to_float32(ref_emb))
            dist = self.compute_pairwise(query, ref)
            if self.power != 1:
                dist = dist**self.power
        return dist

    def compute_powered_mat(self, query: Tensor, ref: Tensor) -> Tensor:
        """The matrix of already-normalised float32 rows, raised to ``power``."""
        mat = self.compute_mat(query, ref)
        return mat if self.power == 1 else mat**self.power

    def compute_mat(self, query: Tensor, ref: Tensor) -> Tensor:
        raise NotImplementedError

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        raise NotImplementedError

    # -- helpers shared with losses and miners -------------------------------------------------
    def smallest_dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Elementwise 'closest' of two distance tensors."""
        return torch.max(x, y) if self.is_inverted else torch.min(x, y)

    def largest_dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Elementwise 'farthest' of two distance tensors."""
        return torch.min(x, y) if self.is_inverted else torch.max(x, y)

    def margin(self, x: Tensor | float, y: Tensor | float) -> Tensor:
        """How much closer ``y`` is than ``x`` (positive when ``x`` is farther)."""
        result = y - x if self.is_inverted else x - y
        assert isinstance(result, Tensor)
        return result

    def normalize(self, embeddings: Tensor, dim: int = 1) -> Tensor:
        if self.p == 2 and embeddings.ndim == 2:
            return l2_normalize(embeddings, dim)
        return F.normalize(embeddings, p=self.p, dim=dim)

    def maybe_normalize(self, embeddings: Tensor, dim: int = 1) -> Tensor:
        return self.normalize(embeddings, dim=dim) if self.normalize_embeddings else embeddings

    def get_norm(self, embeddings: Tensor, dim: int = 1) -> Tensor:
        return torch.linalg.vector_norm(embeddings, ord=self.p, dim=dim)

    def extra_repr(self) -> str:
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p}, power={self.power}"


class LpDistance(BaseDistance):
    """Minkowski distance ``||q - r||_p`` (Euclidean for ``p=2``), optionally raised to ``power``.

    Defaults as in PML: ``normalize_embeddings=True, p=2, power=1``. For ``p=2`` the matrix is
    one matrix product; ``power=2`` skips the square root entirely.
    """

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1) -> None:
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power)

    def compute_powered_mat(self, query: Tensor, ref: Tensor) -> Tensor:
        if self.p == 2 and self.power == 2:
            # squared Euclidean straight from the matrix product: no sqrt, then no square
            return _squared_euclidean(query, ref)
        return super().compute_powered_mat(query, ref)

    def compute_mat(self, query: Tensor, ref: Tensor) -> Tensor:
        if self.p == 2:
            return euclidean_matrix(query, ref)
        return torch.cdist(query, ref, p=self.p)

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        if self.p == 2:
            return _safe_sqrt(((query - ref) ** 2).sum(dim=1))
        return torch.linalg.vector_norm(query - ref, ord=self.p, dim=1)


class _EuclideanMatrix(torch.autograd.Function):
    """``||q_i - r_j||`` for all pairs, with a hand-written backward: two matrix products
    instead of autograd through ``addmm``, ``clamp`` and ``sqrt`` (about twice as fast, and only
    the output is kept for the backward pass). The gradient of a zero distance is zero."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, query: Tensor, ref: Tensor) -> Tensor:
        dist = _squared_euclidean(query, ref).sqrt_()
        if query is ref:  # a sample's distance to itself is exactly 0, not rounding noise
            dist.fill_diagonal_(0)
        ctx.save_for_backward(query, ref, dist)
        return dist

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        query, ref, dist = ctx.saved_tensors  # type: ignore[attr-defined]
        # d dist_ij / d q_i = (q_i - r_j) / dist_ij, and minus that for r_j
        weight = torch.where(dist > 0, grad / dist, 0)
        grad_query = grad_ref = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            grad_query = weight.sum(dim=1, keepdim=True) * query - weight @ ref
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            grad_ref = weight.sum(dim=0).unsqueeze(1) * ref - weight.t() @ query
        return grad_query, grad_ref


def euclidean_matrix(query: Tensor, ref: Tensor) -> Tensor:
    """``(Nq, D)``, ``(Nr, D)`` -> ``(Nq, Nr)`` Euclidean distances from one matrix product,
    with a finite (zero) gradient where two rows are equal."""
    result = _EuclideanMatrix.apply(query, ref)
    assert isinstance(result, Tensor)
    return result


def _squared_euclidean(query: Tensor, ref: Tensor) -> Tensor:
    query_sq = (query * query).sum(dim=1, keepdim=True)
    ref_sq = (ref * ref).sum(dim=1).unsqueeze(0)
    # addmm: query_sq + ref_sq - 2 q rᵀ in one fused matrix product
    return torch.addmm(query_sq + ref_sq, query, ref.t(), alpha=-2.0).clamp_min(0)


class DotProductSimilarity(BaseDistance):
    """Inner product ``q · r`` (a similarity: larger is closer). As in PML the embeddings are
    L2-normalised by default (then it equals :class:`CosineSimilarity`); pass
    ``normalize_embeddings=False`` for the raw inner product."""

    def __init__(self, normalize_embeddings: bool = True, power: float = 1) -> None:
        super().__init__(
            normalize_embeddings=normalize_embeddings, p=2, power=power, is_inverted=True
        )

    def compute_mat(self, query: Tensor, ref: Tensor) -> Tensor:
        return query @ ref.t()

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        return (query * ref).sum(dim=1)


class CosineSimilarity(DotProductSimilarity):
    """Cosine similarity: the inner product of L2-normalised embeddings, in ``[-1, 1]``."""

    def __init__(self, normalize_embeddings: bool = True, power: float = 1) -> None:
        if not normalize_embeddings:
            raise ValueError(
                "CosineSimilarity always normalises; "
                "use DotProductSimilarity(normalize_embeddings=False) for raw inner products"
            )
        super().__init__(normalize_embeddings=True, power=power)


class SNRDistance(BaseDistance):
    """Signal-to-noise ratio distance: ``var(r - q) / var(q)``, the variance of the difference
    (the noise) over the variance of the query (the signal).

    Yuan, Chen, Zhang & Tian, "Signal-To-Noise Ratio: A Robust Distance Metric for Deep Metric
    Learning", CVPR 2019. Defaults as in PML (embeddings L2-normalised first; ``power=1``). Not
    symmetric: ``d(q, r) != d(r, q)``. With ``qc``, ``rc`` the rows less their means, the ratio is
    ``|qc - rc|² / |qc|²``, so the matrix is one matrix product (PML forms every ``(Nq, Nr, D)``
    difference).
    """

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1) -> None:
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power)

    def compute_mat(self, query: Tensor, ref: Tensor) -> Tensor:
        query_c = query - query.mean(dim=1, keepdim=True)
        ref_c = ref - ref.mean(dim=1, keepdim=True)
        signal = (query_c * query_c).sum(dim=1, keepdim=True)
        return _squared_euclidean(query_c, ref_c) / signal

    def compute_pairwise(self, query: Tensor, ref: Tensor) -> Tensor:
        query_c = query - query.mean(dim=1, keepdim=True)
        noise = query_c - (ref - ref.mean(dim=1, keepdim=True))
        return (noise * noise).sum(dim=1) / (query_c * query_c).sum(dim=1)
