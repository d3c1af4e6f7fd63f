"""Hardness-aware deep metric learning (Zheng, Chen, Lu & Zhou, CVPR 2019).

HDML makes the negatives of a batch *harder* by an amount that follows training: every negative
embedding ``z-`` of a triplet ``(z, z+, z-)`` is pulled along the segment towards its anchor,

    ẑ- = z + [d+ + (d- - d+) · exp(-alpha / J_avg)] / d- · (z- - z)        (when d+ < d-),

where ``d+ = ||z - z+||``, ``d- = ||z - z-||`` and ``J_avg`` is the recent average metric loss.
Early on (large ``J_avg``) the negative barely moves; as the loss falls it moves towards distance
``d+``, which makes the triplet hard. A generator (two fully connected layers) maps embeddings
back to the trunk's feature space; the synthetic features are re-embedded by the model's own
embedding head, so the synthetic negative lives where the model's real embeddings live, and a
softmax classifier on trunk features keeps it recognisable as its class.

Three losses train three parts, as the paper's three optimisers do (all computed by one
:meth:`HDML.step_losses` call; gradients are routed with ``detach`` so that summing them and
calling ``backward()`` once trains each part with its own loss only):

* ``metric_loss`` ``J_metric = e^(-beta/J_gen) J_m + (1 - e^(-beta/J_gen)) J_syn`` -> the trunk
  and the embedding head (and the metric loss's own parameters, if any). Its gradient flows
  *through* the generator to the embeddings but never into the generator's weights.
* ``generator_loss`` ``J_gen = J_recon + lambda · J_soft`` -> the generator only.
* ``classifier_loss`` (softmax cross-entropy on real trunk features) -> the classifier only.

Typical loop::

    hdml = HDML(model.embed_features, TripletMarginLoss(margin=0.1),
                feature_size=128, embedding_size=32, num_classes=n_train_classes)
    optimizer = torch.optim.Adam(hdml.parameter_groups(model, metric_lr=1e-3))
    for x, labels in loader:
        features = model.features(x)
        out = hdml.step_losses(features, model.embed_features(features), labels)
        optimizer.zero_grad()
        out.total().backward()
        optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_embeddings, check_indices_tuple, check_labels
from .losses.npairs import NPairsLoss, first_pair_per_label
from .losses.tuplet_npairs import TupletNPairsLoss
from .losses.tuplet_npairs import grouped_log1p_sum_exp as grouped_log1p_sum_exp  # (re-export)
from .pairwise import all_triplets, label_masks, pairs_to_triplets, random_triplets, to_pairs

# Paper defaults (official code, github.com/wzzheng/HDML).
ALPHA_TRIPLET = 7.0
ALPHA_NPAIRS = 90.0


# -- the hardness-aware interpolation ---------------------------------------------------------


def _row_norm(x: Tensor) -> Tensor:
    """Euclidean norm of each row, ``(N, D) -> (N,)``, with gradient 0 (not NaN) at 0."""
    squared = (x * x).sum(dim=1)
    is_zero = squared == 0
    return torch.sqrt(squared.masked_fill(is_zero, 1.0)).masked_fill(is_zero, 0.0)


def decay_factor(scale: float, running_mean: float | Tensor, like: Tensor) -> Tensor:
    """``exp(-scale / running_mean)`` as a scalar tensor (dtype and device of ``like``).

    The limits are taken where the quotient is undefined: a running mean of 0 gives 0 (the
    factor of an infinitely small loss), of ``inf`` gives 1, and ``scale == 0`` always gives 1.
    Raises ``ValueError`` for a negative or NaN running mean or a negative scale.
    """
    if scale < 0:
        raise ValueError(f"the scale (alpha or beta) must be >= 0, got {scale}")
    mean = torch.as_tensor(running_mean, dtype=like.dtype, device=like.device)
    if mean.numel() != 1:
        raise ValueError(f"the running mean must be a scalar, got shape {tuple(mean.shape)}")
    mean = mean.reshape(())
    if bool(torch.isnan(mean) | (mean < 0)):
        raise ValueError(f"the running mean must be >= 0 (not NaN), got {float(mean)}")
    if scale == 0:
        return torch.ones((), dtype=like.dtype, device=like.device)
    # -scale / 0 = -inf -> exp = 0;  -scale / inf = -0 -> exp = 1
    return torch.exp(-scale / mean)


def hardness_aware_negatives(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    j_avg: float | Tensor,
    alpha: float,
) -> Tensor:
    """Pull each negative towards its anchor by a training-adaptive amount (HDML, eq. 4).

    Zheng, Chen, Lu & Zhou, "Hardness-Aware Deep Metric Learning", CVPR 2019. Row ``i`` is one
    triplet ``(z, z+, z-)``; with ``d+ = ||z - z+||`` and ``d- = ||z - z-||``::

        ẑ- = z + [d+ + (d- - d+) · exp(-alpha / j_avg)] / d- · (z- - z)   if d+ < d-
        ẑ- = z-                                                          otherwise

    so ``ẑ-`` lies on the segment from ``z`` to ``z-`` at distance between ``d+`` (``j_avg ->
    0``) and ``d-`` (``j_avg -> inf``). Differentiable in the three inputs; a zero ``d-`` (then
    ``d+ >= d-``), a zero ``d+``, ``j_avg = 0`` and ``j_avg = inf`` give finite values and
    gradients.

    Args:
        anchor, positive, negative: ``(N, D)`` floating tensors, one triplet per row.
        j_avg: the recent average metric loss, ``>= 0`` (a float or a scalar tensor).
        alpha: ``>= 0``; larger pulls harder for the same ``j_avg`` (paper: 7 with triplet,
            90 with N-pair losses).

    Returns:
        ``(N, D)`` synthetic negatives, same dtype as the inputs.
    """
    check_embeddings(anchor, "anchor")
    check_embeddings(positive, "positive")
    check_embeddings(negative, "negative")
    if not (anchor.shape == positive.shape == negative.shape):
        raise ValueError(
            "anchor, positive and negative must have the same (N, D) shape, got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    factor = decay_factor(alpha, j_avg, anchor)
    d_pos = _row_norm(positive - anchor)
    d_neg = _row_norm(negative - anchor)
    pull = d_pos < d_neg  # implies d_neg > 0
    safe_d_neg = torch.where(pull, d_neg, torch.ones_like(d_neg))
    ratio = (d_pos + (d_neg - d_pos) * factor) / safe_d_neg  # in [d+/d-, 1]
    pulled = anchor + ratio.unsqueeze(1) * (negative - anchor)
    return torch.where(pull.unsqueeze(1), pulled, negative)


# -- generator and the HDML module ------------------------------------------------------------


class HDMLGenerator(nn.Module):
    """Two fully connected layers mapping embeddings back to the trunk's feature space.

    Zheng et al., CVPR 2019: ``Linear(D, hidden) -> ReLU -> Linear(hidden, F)``. The official
    code puts BatchNorm after the first ReLU; it is left out here so the generator is a pure
    function that can run twice per step (once to train it, once with frozen weights for the
    metric loss) without updating running statistics twice.

    ``forward(z, frozen=True)`` uses detached weights: gradients reach ``z`` but not the
    generator. Shapes: ``(N, D) -> (N, F)``.
    """

    def __init__(self, embedding_size: int, feature_size: int, hidden_size: int = 512) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embedding_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, feature_size)

    def forward(self, z: Tensor, frozen: bool = False) -> Tensor:
        weights: list[Tensor] = [self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias]
        if frozen:
            weights = [w.detach() for w in weights]
        w1, b1, w2, b2 = weights
        return F.linear(F.relu(F.linear(z, w1, b1)), w2, b2)


@dataclass
class HDMLLosses:
    """The three losses of one HDML step (Zheng et al., CVPR 2019), each meant for its own
    part of the model. All tensors are scalars.

    ``metric_loss`` trains the trunk and head, ``generator_loss`` the generator and
    ``classifier_loss`` the softmax classifier; their gradients do not cross (see
    :class:`HDML`), so ``total().backward()`` trains each part with its own loss. The remaining
    fields are detached scalars for logging.
    """

    metric_loss: Tensor  # J_metric
    generator_loss: Tensor  # J_gen = J_recon + lambda * J_soft
    classifier_loss: Tensor  # cross-entropy of the classifier on real trunk features
    j_m: Tensor  # the metric loss on the real batch
    j_syn: Tensor  # the metric loss on the synthetic batch
    j_recon: Tensor
    j_soft: Tensor
    synthetic_weight: Tensor  # 1 - exp(-beta / J_gen), the weight of J_syn in J_metric
    num_synthetic: int  # synthetic negatives generated this step

    def total(self) -> Tensor:
        """The sum of the three losses: one ``backward()`` trains all three parts."""
        return self.metric_loss + self.generator_loss + self.classifier_loss


class HDML(nn.Module):
    """Hardness-aware deep metric learning around any deepmetric loss.

    Zheng, Chen, Lu & Zhou, "Hardness-Aware Deep Metric Learning", CVPR 2019.

    HDML owns the generator, the softmax classifier and the running means; the trunk and the
    embedding head stay in your model. Each step (:meth:`step_losses`):

    1. ``J_m = metric_loss(z, labels, indices_tuple)`` on the real embeddings ``z``.
    2. Triplets ``(a, p, n)`` are chosen (below) and each negative is made harder:
       ``ẑ = hardness_aware_negatives(z[a], z[p], z[n], J_avg, alpha)``.
    3. The real embeddings and the ``T`` synthetic negatives go through the generator (frozen
       weights) and back through ``head``: ``z~ = head(G(cat[z, ẑ]))``, ``(B + T, D)``, with
       labels ``cat[labels, labels[n]]``. ``J_syn`` is the metric loss with the
       ``indices_tuple`` ``(a, p, B + t)``: anchor and positive are the re-embedded real
       samples, the negative is the synthetic one. Any loss that reads an ``indices_tuple``
       therefore works unchanged. The call is ``loss(z~[:B], labels, indices_tuple,
       ref_emb=z~, ref_labels=...)`` (queries: the re-embedded batch; references: the batch
       followed by the synthetic negatives), which gives the same value as the loss on the
       concatenated batch but needs a ``B × (B + T)`` matrix instead of ``(B + T)²``.
    4. ``J_metric = w J_m + (1 - w) J_syn`` with ``w = exp(-beta / J_gen_avg)``.
    5. ``J_gen = J_recon + lambda J_soft``: ``J_recon = sum ||G(z) - y||²`` over the batch
       (trunk features ``y``), ``J_soft = softmax_factor · CE(classifier(G(cat[z, ẑ])),
       cat[labels, labels[n]])``, both with ``z``, ``ẑ`` detached and the classifier frozen.
    6. ``classifier_loss = CE(classifier(y.detach()), labels)``.
    7. In training mode the running means ``J_avg`` (of ``J_m``) and ``J_gen_avg`` (of
       ``J_gen``) are updated.

    Gradient routing (the paper's three optimisers): ``J_metric`` reaches the trunk, the head
    and the metric loss's own parameters (through the frozen generator as well), never the
    generator or the classifier; ``J_gen`` reaches only the generator; the classifier loss
    only the classifier. :meth:`parameter_groups` builds the matching optimiser groups.

    Which triplets: a miner's ``indices_tuple`` when given (pairs are joined into triplets);
    otherwise ``triplets_per_anchor`` random triplets per anchor (``"all"``: every triplet,
    ``B·(K-1)·(B-K)`` synthetic samples, for small batches only). With an
    :class:`~deepmetric.losses.npairs.NPairsLoss`, as in the paper's N-pair variant, the pairs
    are those the N-pair loss keeps (one per class) and each anchor's negatives are all the
    other pairs' positives, pulled towards it; since ``NPairsLoss`` takes its negatives from the
    other pairs' positives and would ignore synthetic ones, ``J_syn`` then uses
    :class:`TupletNPairsLoss` with the same distance and reducer (pass ``synthetic_loss`` to
    choose another).

    Running means follow the official code: the mean of ``J`` over the last complete window of
    ``window`` steps, refreshed every ``window`` steps, ``initial_mean`` before the first window
    is complete (NaN or infinite values are skipped). They are buffers, so ``state_dict()``
    resumes them exactly.

    Scale: ``beta`` is calibrated against ``J_gen`` at the official code's scale (``J_recon``
    summed over the batch, ``J_soft`` multiplied by ``softmax_factor=1e4``), and ``alpha``
    against the magnitude of the metric loss; with a loss that is much smaller than the
    official one (deepmetric's losses are means, the official triplet loss is a sum) a smaller
    ``alpha`` keeps the pulling gradual.

    Args:
        head: the model's embedding head, trunk features ``(N, F)`` -> embeddings ``(N, D)``
            (e.g. ``EmbeddingNet.embed_features``); called on synthetic features. Not
            registered as a submodule: it belongs to your model.
        metric_loss: any deepmetric loss ``loss(embeddings, labels, indices_tuple, ref_emb,
            ref_labels)`` that reads the ``indices_tuple`` (pair- and triplet-based losses).
        feature_size: ``F``, width of the trunk features.
        embedding_size: ``D``, width of the embeddings.
        num_classes: classes of the training set (labels in ``[0, num_classes)``).
        alpha: interpolation strength; ``None``: 90 with ``NPairsLoss``, 7 otherwise.
        beta: weight schedule of ``J_syn`` (1e4).
        lambda_: weight of ``J_soft`` in ``J_gen`` (0.5).
        softmax_factor: scale of the cross-entropy in ``J_soft`` (1e4, official code).
        hidden_size: width of the generator's hidden layer (512).
        window: steps per running-mean window (64, official code).
        initial_mean: running means before the first complete window (1e6: no pulling and
            ``J_m`` weighted ~0.99 at the start).
        triplets_per_anchor: random triplets per anchor when no ``indices_tuple`` is given.
        synthetic_loss: the loss for ``J_syn`` (default: ``metric_loss``, or
            ``TupletNPairsLoss`` for ``NPairsLoss``).

    Shapes: ``step_losses(features (B, F), embeddings (B, D), labels (B,))`` -> :class:`HDMLLosses`.
    """

    head: Callable[[Tensor], Tensor]
    j_avg: Tensor
    j_gen: Tensor
    window_sum_m: Tensor
    window_sum_gen: Tensor
    window_count: Tensor

    def __init__(
        self,
        head: Callable[[Tensor], Tensor],
        metric_loss: nn.Module,
        feature_size: int,
        embedding_size: int,
        num_classes: int,
        *,
        alpha: float | None = None,
        beta: float = 1e4,
        lambda_: float = 0.5,
        softmax_factor: float = 1e4,
        hidden_size: int = 512,
        window: int = 64,
        initial_mean: float = 1e6,
        triplets_per_anchor: int | Literal["all"] = 1,
        synthetic_loss: nn.Module | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("feature_size", feature_size),
            ("embedding_size", embedding_size),
            ("num_classes", num_classes),
            ("hidden_size", hidden_size),
            ("window", window),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if triplets_per_anchor != "all" and (
            not isinstance(triplets_per_anchor, int) or triplets_per_anchor < 1
        ):
            raise ValueError(
                f"triplets_per_anchor must be 'all' or a positive int, got {triplets_per_anchor!r}"
            )
        npairs = isinstance(metric_loss, NPairsLoss)
        if alpha is None:
            alpha = ALPHA_NPAIRS if npairs else ALPHA_TRIPLET
        for name, number in (
            ("alpha", alpha),
            ("beta", beta),
            ("lambda_", lambda_),
            ("softmax_factor", softmax_factor),
        ):
            if not number >= 0:
                raise ValueError(f"{name} must be >= 0, got {number}")
        if not initial_mean > 0:
            raise ValueError(f"initial_mean must be > 0, got {initial_mean}")
        if synthetic_loss is None:
            if npairs:
                assert isinstance(metric_loss, NPairsLoss)
                synthetic_loss = TupletNPairsLoss(
                    distance=metric_loss.distance, reducer=metric_loss.reducer
                )
            else:
                synthetic_loss = metric_loss

        # a plain attribute, not a registered submodule: the head belongs to the caller's model
        self.__dict__["head"] = head
        self.metric_loss = metric_loss
        self.synthetic_loss = synthetic_loss
        self.npairs_layout = npairs
        self.generator = HDMLGenerator(embedding_size, feature_size, hidden_size)
        self.classifier = nn.Linear(feature_size, num_classes)
        self.feature_size = feature_size
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.lambda_ = float(lambda_)
        self.softmax_factor = float(softmax_factor)
        self.window = window
        self.triplets_per_anchor = triplets_per_anchor
        self.register_buffer("j_avg", torch.tensor(float(initial_mean)))
        self.register_buffer("j_gen", torch.tensor(float(initial_mean)))
        self.register_buffer("window_sum_m", torch.tensor(0.0))
        self.register_buffer("window_sum_gen", torch.tensor(0.0))
        self.register_buffer("window_count", torch.tensor(0, dtype=torch.long))

    # -- one training step ----------------------------------------------------------------------

    def forward(
        self,
        features: Tensor,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple[Tensor, ...] | None = None,
    ) -> HDMLLosses:
        """Same as :meth:`step_losses`."""
        return self.step_losses(features, embeddings, labels, indices_tuple)

    def step_losses(
        self,
        features: Tensor,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple[Tensor, ...] | None = None,
    ) -> HDMLLosses:
        """The three HDML losses of one batch (and, in training mode, a running-mean update).

        Args:
            features: ``(B, F)`` trunk features ``y`` of the batch.
            embeddings: ``(B, D)`` ``head(features)``, the batch's embeddings ``z``.
            labels: ``(B,)`` integer labels in ``[0, num_classes)``.
            indices_tuple: optional miner output, used for ``J_m`` and as the triplets to make
                harder.
        """
        check_embeddings(features, "features")
        check_embeddings(embeddings, "embeddings")
        if features.shape[1] != self.feature_size:
            raise ValueError(
                f"features have width {features.shape[1]}, expected feature_size="
                f"{self.feature_size}"
            )
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings have width {embeddings.shape[1]}, expected embedding_size="
                f"{self.embedding_size}"
            )
        if len(features) != len(embeddings):
            raise ValueError(f"{len(features)} feature rows but {len(embeddings)} embedding rows")
        labels = check_labels(labels, embeddings)
        if labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, num_classes={self.num_classes})")
        if indices_tuple is not None:
            indices_tuple = check_indices_tuple(indices_tuple, len(labels), len(labels))

        j_m = self.metric_loss(embeddings, labels, indices_tuple)
        a, p, n = self.synthesis_triplets(labels, indices_tuple)
        pulled = hardness_aware_negatives(
            embeddings[a], embeddings[p], embeddings[n], self.j_avg, self.alpha
        )
        latent = torch.cat([embeddings, pulled])  # (B + T, D)
        syn_labels = torch.cat([labels, labels[n]])
        batch_size = len(labels)
        syn_negatives = torch.arange(batch_size, batch_size + len(n), device=labels.device)

        # metric path: frozen generator, live head; gradient reaches z (and so the trunk)
        syn_embeddings = self.head(self.generator(latent, frozen=True))
        j_syn = self.synthetic_loss(
            syn_embeddings[:batch_size],
            labels,
            (a, p, syn_negatives),
            ref_emb=syn_embeddings,
            ref_labels=syn_labels,
        )
        keep_real = decay_factor(self.beta, self.j_gen, j_m)
        metric_loss = keep_real * j_m + (1 - keep_real) * j_syn

        # generator path: live generator, everything upstream detached, classifier frozen
        generated = self.generator(latent.detach())
        j_recon = ((generated[:batch_size] - features.detach()) ** 2).sum()
        weight, bias = self.classifier.weight.detach(), self.classifier.bias.detach()
        logits = F.linear(generated, weight, bias)
        j_soft = self.softmax_factor * F.cross_entropy(logits, syn_labels)
        generator_loss = j_recon + self.lambda_ * j_soft

        # classifier path: real features, detached
        classifier_loss = F.cross_entropy(self.classifier(features.detach()), labels)

        if self.training:
            self.update_running_means(j_m.detach(), generator_loss.detach())
        return HDMLLosses(
            metric_loss=metric_loss,
            generator_loss=generator_loss,
            classifier_loss=classifier_loss,
            j_m=j_m.detach(),
            j_syn=j_syn.detach(),
            j_recon=j_recon.detach(),
            j_soft=j_soft.detach(),
            synthetic_weight=(1 - keep_real).detach(),
            num_synthetic=len(n),
        )

    def synthesis_triplets(
        self, labels: Tensor, indices_tuple: tuple[Tensor, ...] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The ``(a, p, n)`` triplets whose negatives are made harder, each ``(T,)``."""
        if self.npairs_layout:
            if indices_tuple is None:
                pos_mask, _ = label_masks(labels, labels, same_source=True)
                anchors, positives = torch.where(pos_mask)
            else:
                anchors, positives, _, _ = to_pairs(indices_tuple)
            anchors, positives = first_pair_per_label(anchors, positives, labels)
            off_diagonal = ~torch.eye(len(anchors), dtype=torch.bool, device=labels.device)
            i, j = torch.where(off_diagonal)
            return anchors[i], positives[i], positives[j]
        if indices_tuple is not None:
            return pairs_to_triplets(indices_tuple)
        pos_mask, neg_mask = label_masks(labels, labels, same_source=True)
        if self.triplets_per_anchor == "all":
            return all_triplets(pos_mask, neg_mask)
        return random_triplets(pos_mask, neg_mask, self.triplets_per_anchor)

    # -- running means --------------------------------------------------------------------------

    @torch.no_grad()
    def update_running_means(self, j_m: Tensor | float, j_gen: Tensor | float) -> None:
        """Count one step: add ``j_m`` and ``j_gen`` to the current window, and once it holds
        ``window`` steps make its means the new ``j_avg`` and ``j_gen`` and start a new window.
        A step with a NaN or infinite value is not counted (as in the official code)."""
        m = torch.as_tensor(j_m, dtype=self.j_avg.dtype, device=self.j_avg.device)
        gen = torch.as_tensor(j_gen, dtype=self.j_gen.dtype, device=self.j_gen.device)
        valid = torch.isfinite(m) & torch.isfinite(gen)
        zero = torch.zeros_like(m)
        self.window_sum_m += torch.where(valid, m, zero)
        self.window_sum_gen += torch.where(valid, gen, zero)
        self.window_count += valid.long()
        full = self.window_count >= self.window
        count = self.window_count.clamp_min(1).to(self.j_avg.dtype)
        self.j_avg.copy_(torch.where(full, self.window_sum_m / count, self.j_avg))
        self.j_gen.copy_(torch.where(full, self.window_sum_gen / count, self.j_gen))
        self.window_sum_m.masked_fill_(full, 0.0)
        self.window_sum_gen.masked_fill_(full, 0.0)
        self.window_count.masked_fill_(full, 0)

    # -- optimiser set-up -----------------------------------------------------------------------

    def parameter_groups(
        self,
        metric_model: nn.Module | Iterable[nn.Parameter],
        metric_lr: float,
        generator_lr: float = 1e-2,
        classifier_lr: float = 1e-3,
    ) -> list[dict[str, Any]]:
        """Optimiser parameter groups for the three parts (official learning rates for the
        generator, 1e-2, and the classifier, 1e-3).

        ``metric_model`` holds the trunk and the head (your model); the metric loss's own
        parameters, if any (e.g. proxies), join its group. Use one optimiser over the groups,
        or one optimiser per group, as the paper does; either way each part only ever receives
        the gradient of its own loss. Raises ``ValueError`` if ``metric_model`` contains the
        generator or the classifier.
        """
        if isinstance(metric_model, nn.Module):
            metric_params = list(metric_model.parameters())
        else:
            metric_params = list(metric_model)
        own = {id(p) for p in self.generator.parameters()}
        own |= {id(p) for p in self.classifier.parameters()}
        if any(id(p) in own for p in metric_params):
            raise ValueError(
                "metric_model contains HDML's generator or classifier: pass only the model "
                "(trunk and head)"
            )
        seen = {id(p) for p in metric_params}
        for module in (self.metric_loss, self.synthetic_loss):
            for param in module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    metric_params.append(param)
        return [
            {"params": metric_params, "lr": metric_lr, "name": "metric"},
            {"params": list(self.generator.parameters()), "lr": generator_lr, "name": "generator"},
            {
                "params": list(self.classifier.parameters()),
                "lr": classifier_lr,
                "name": "classifier",
            },
        ]

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, lambda_={self.lambda_}, "
            f"softmax_factor={self.softmax_factor}, window={self.window}, "
            f"triplets_per_anchor={self.triplets_per_anchor!r}"
        )
