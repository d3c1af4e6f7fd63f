"""Proxy-based losses: ProxyNCA (Movshovitz-Attias et al., 2017) and ProxyAnchor (Kim et al., 2020),
and the machinery shared by every loss that learns one vector per class. Their formulas are
:func:`deepmetric.functional.proxy_nca_losses` and
:func:`~deepmetric.functional.proxy_anchor_losses`.

A *class-weight loss* owns an ordinary ``nn.Parameter`` (the proxies of the proxy losses, the
classifier matrix ``W`` of the softmax-margin losses in :mod:`.softmax_margin`), so
``loss.parameters()`` goes to an optimizer. Parameter names and shapes are PML's, so a PML loss's
``state_dict`` loads into ours with ``strict=True``. Differences from PML, all deliberate:

* the parameter is never cast in place: PML overwrites ``W.data`` with the embeddings' dtype on
  every call (under autocast the weights silently become bfloat16 / float16 for good). Here the
  logits are computed in the wider of the two dtypes, and in float32 for half-precision input,
  with autocast switched off; gradients flow back to the parameter in its own dtype;
* labels are required and must lie in ``[0, num_classes)``; anything else is a ``ValueError``
  naming the label (PML fails inside ``one_hot``/``cross_entropy``, or silently drops the sample);
* ``ref_emb`` is not supported (a ``ValueError``, as in PML).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import reduce
from typing import TypedDict

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from .._checks import check_positive_int
from ..distances import BaseDistance, CosineSimilarity, LpDistance
from ..functional import proxy_anchor_losses, proxy_nca_losses
from ..reducers import BaseReducer, DivisorReducer, LossDict, LossInfo, row_entry, scalar_entry
from .base import BaseMetricLossFunction, Batch, LossOptions

_HALF = (torch.float16, torch.bfloat16)


# -- shared machinery of the class-weight losses --------------------------------------------------


class WeightOptions(TypedDict, total=False):
    """Keyword options of a loss with learnable class weights (PML's ``WeightRegularizerMixin``).

    ``weight_regularizer`` maps the ``(num_classes, embedding_size)`` weights to a scalar penalty,
    added as ``weight_reg_loss`` times ``weight_reg_weight``; ``weight_init_func`` is called once
    on the new parameter (in place, under ``torch.no_grad``).
    """

    weight_regularizer: Callable[[Tensor], Tensor] | None
    weight_reg_weight: float
    weight_init_func: Callable[[Tensor], object] | None


class WeightLossOptions(LossOptions, WeightOptions, total=False):
    """:class:`LossOptions` plus :class:`WeightOptions`: every option of a class-weight loss."""


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the logits are computed in: the widest of the inputs', float32 for half."""
    dtype = reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.float32 if dtype in _HALF else dtype


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off, so nothing inside is silently computed in half precision."""
    with torch.autocast(device.type, enabled=False):
        yield


def miner_weights(
    indices_tuple: tuple[Tensor, ...] | None,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    anchors_only: bool = False,
) -> Tensor:
    """``(B,)`` per-sample weights from a miner's tuple, as PML's ``convert_to_weights``: each
    sample's number of appearances divided by the largest count (0 if it never appears); all ones
    without a tuple, or with an empty one. ``anchors_only`` counts only the anchors."""
    weights = torch.ones(batch_size, dtype=dtype, device=device)
    if indices_tuple is None or all(len(idx) == 0 for idx in indices_tuple):
        return weights
    if anchors_only:
        parts = indices_tuple[:1] if len(indices_tuple) == 3 else indices_tuple[0::2]
    else:
        parts = indices_tuple
    counts = torch.bincount(torch.cat(parts), minlength=batch_size).to(dtype)
    return counts / counts.max()


def check_class_labels(labels: Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, num_classes)``."""
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        label = int(labels[bad][0])
        raise ValueError(f"label {label} is outside [0, num_classes) = [0, {num_classes})")


def _normal_init(weight: Tensor) -> None:
    nn.init.normal_(weight)


class ClassWeightLoss(BaseMetricLossFunction):
    """Base class of the losses that learn one vector per class (proxies or classifier weights).

    Holds the weight options (see :class:`WeightOptions`), creates the parameter, validates the
    labels, and adds the weight regularizer's penalty to the loss dict.
    """

    requires_labels = True
    supports_ref_emb = False

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        weight_regularizer: Callable[[Tensor], Tensor] | None = None,
        weight_reg_weight: float = 1.0,
        weight_init_func: Callable[[Tensor], object] | None = None,
        **options: Unpack[LossOptions],
    ) -> None:
        super().__init__(**options)
        check_positive_int(num_classes, "num_classes")
        check_positive_int(embedding_size, "embedding_size")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.weight_regularizer = weight_regularizer
        self.weight_reg_weight = weight_reg_weight
        self.weight_init_func = (
            self.get_default_weight_init_func() if weight_init_func is None else weight_init_func
        )

    def get_default_weight_init_func(self) -> Callable[[Tensor], object]:
        return _normal_init

    def new_weight(self, *shape: int) -> nn.Parameter:
        """A new parameter of ``shape`` (default dtype), initialised by ``weight_init_func``."""
        weight = nn.Parameter(torch.empty(*shape))
        with torch.no_grad():
            self.weight_init_func(weight)
        return weight

    def class_labels(self, batch: Batch) -> Tensor:
        """The batch's labels, checked: required, in range, and no separate reference set."""
        if batch.labels is None:
            raise ValueError(f"labels are required for {type(self).__name__}")
        if not batch.same_source:
            same = batch.ref_emb is batch.embeddings and (
                batch.ref_labels is not None and torch.equal(batch.ref_labels, batch.labels)
            )
            if not same:
                raise ValueError(f"ref_emb is not supported for {type(self).__name__}")
        check_class_labels(batch.labels, self.num_classes)
        return batch.labels

    def add_weight_regularization(self, loss_dict: LossDict, weights: Tensor) -> None:
        """Add ``weight_reg_loss`` for the ``(num_classes, embedding_size)`` weights, if any."""
        if self.weight_regularizer is not None:
            penalty = self.weight_regularizer(weights) * self.weight_reg_weight
            loss_dict["weight_reg_loss"] = scalar_entry(penalty)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"


# -- ProxyNCA -------------------------------------------------------------------------------------


class ProxyNCALoss(ClassWeightLoss):
    """Neighbourhood components analysis against one learnable proxy per class.

    Movshovitz-Attias, Toshev, Leung, Ioffe & Singh, "No Fuss Distance Metric Learning using
    Proxies", 2017. For each sample, the negative log of the softmax probability of its class's
    proxy, with logits ``-softmax_scale * d(x, proxy)`` (``+`` for a similarity). Defaults as in
    PML: ``softmax_scale=1``, ``LpDistance(power=2)`` (squared Euclidean on normalised vectors),
    proxies initialised by ``normal_``, ``MeanReducer``. With a miner, each sample is weighted by
    how often it appears as an anchor.

    Unlike PML, a sample whose class probability underflows to 0 keeps its (large, finite) loss;
    PML drops it from the batch.

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` in ``[0, num_classes)`` -> scalar;
    parameter ``proxies``: ``(num_classes, embedding_size)``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        softmax_scale: float = 1,
        **options: Unpack[WeightLossOptions],
    ) -> None:
        super().__init__(num_classes, embedding_size, **options)
        self.softmax_scale = softmax_scale
        self.proxies = self.new_weight(num_classes, embedding_size)

    def get_default_distance(self) -> BaseDistance:
        return LpDistance(power=2)

    def compute_loss(self, batch: Batch) -> LossDict:
        labels = self.class_labels(batch)
        emb = batch.embeddings
        with full_precision(emb.device):
            dtype = compute_dtype(emb, self.proxies)
            emb, proxies = emb.to(dtype), self.proxies.to(dtype)
            weights = miner_weights(
                batch.indices_tuple, len(emb), dtype, emb.device, anchors_only=True
            )
            mat = self.distance(emb, proxies).to(dtype)
            losses = proxy_nca_losses(mat, labels, self.softmax_scale, self.distance, weights)
        loss_dict: LossDict = {"loss": row_entry(losses)}
        self.add_weight_regularization(loss_dict, proxies)
        return loss_dict

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``(B, embedding_size)`` -> ``(B, num_classes)`` distances (or similarities) to the
        proxies, as PML's ``get_logits``."""
        with full_precision(embeddings.device):
            dtype = compute_dtype(embeddings, self.proxies)
            return self.distance(embeddings.to(dtype), self.proxies.to(dtype))


# -- ProxyAnchor ----------------------------------------------------------------------------------


class ProxyAnchorLoss(ClassWeightLoss):
    """Each proxy pulls its class's samples and pushes the others, weighted by a soft max.

    Kim, Kim, Cho & Kwak, "Proxy Anchor Loss for Deep Metric Learning", 2020. The loss is
    ``mean over proxies with a positive of log(1 + sum_pos exp(-alpha (s - margin)))`` plus
    ``mean over all proxies of log(1 + sum_neg exp(alpha (s + margin)))``. Defaults as in PML:
    ``margin=0.1, alpha=32``, ``CosineSimilarity``, proxies initialised by
    ``kaiming_normal_(mode="fan_out")``, :class:`DivisorReducer` (the two divisors above). With a
    miner, each sample's miner weight ``w`` enters the exponents as ``+ (w - 1)``, as in PML.

    Shapes: embeddings ``(B, embedding_size)``, labels ``(B,)`` in ``[0, num_classes)`` -> scalar;
    parameter ``proxies``: ``(num_classes, embedding_size)``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32,
        **options: Unpack[WeightLossOptions],
    ) -> None:
        super().__init__(num_classes, embedding_size, **options)
        self.margin = margin
        self.alpha = alpha
        self.proxies = self.new_weight(num_classes, embedding_size)

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def get_default_reducer(self) -> BaseReducer:
        return DivisorReducer()

    def get_default_weight_init_func(self) -> Callable[[Tensor], object]:
        return _kaiming_fan_out_init

    def compute_loss(self, batch: Batch) -> LossDict:
        labels = self.class_labels(batch)
        emb = batch.embeddings
        with full_precision(emb.device):
            dtype = compute_dtype(emb, self.proxies)
            emb, proxies = emb.to(dtype), self.proxies.to(dtype)
            weights = miner_weights(batch.indices_tuple, len(emb), dtype, emb.device)
            sim = self.distance(emb, proxies).to(dtype)
            pos, neg = proxy_anchor_losses(
                sim, labels, self.num_classes, self.margin, self.alpha, weights, self.distance
            )
        n_with_pos = int(torch.unique(labels).numel())
        indices = torch.arange(self.num_classes, device=emb.device)
        pos_info: LossInfo = {
            "losses": pos,
            "indices": indices,
            "reduction_type": "element",
            "divisor": n_with_pos,
        }
        neg_info: LossInfo = {
            "losses": neg,
            "indices": indices,
            "reduction_type": "element",
            "divisor": self.num_classes,
        }
        loss_dict: LossDict = {"pos_loss": pos_info, "neg_loss": neg_info}
        self.add_weight_regularization(loss_dict, proxies)
        return loss_dict

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``(B, embedding_size)`` -> ``(B, num_classes)`` similarities to the proxies."""
        with full_precision(embeddings.device):
            dtype = compute_dtype(embeddings, self.proxies)
            return self.distance(embeddings.to(dtype), self.proxies.to(dtype))


def _kaiming_fan_out_init(weight: Tensor) -> None:
    nn.init.kaiming_normal_(weight, mode="fan_out")
