"""The blockwise fast paths of the matrix-based pair losses and miners (the pair engine,
:mod:`deepmetric.pairwise`).

* each row rule's closed-form gradient against autograd through the loss's general functional core;
* ``gradcheck`` in float64 of the custom autograd Functions (row losses, contrastive sums, pair
  distances), for every matrix kind, with and without a separate reference set;
* the fast path against the general path (a distance subclass, which the fast path does not take)
  over block sizes, reducers, reference sets, miner tuples, distances, half precision, zero
  distances and ``no_grad``;
* a batch whose ``masks`` are overridden (asymmetric pairs) on both paths;
* the blockwise miners against the whole-matrix miners (same tuples, same order, same ties);
* the positive pairs (and N-pair's first pair per label) from sorted labels against the label
  masks;
* a miner's few pairs (distances one by one) against PML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor

from deepmetric import distances, miners, pairwise, reducers
from deepmetric.functional import circle_rows as circle_row_losses_and_grad
from deepmetric.functional import (
    generalized_lifted_structure_rows as generalized_lifted_structure_row_losses_and_grad,
)
from deepmetric.functional import multi_similarity_rows as multi_similarity_row_losses_and_grad
from deepmetric.functional import ranked_list_rows as ranked_list_row_losses_and_grad
from deepmetric.losses.circle import CircleLoss
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.lifted import GeneralizedLiftedStructureLoss
from deepmetric.losses.multi_similarity import MultiSimilarityLoss
from deepmetric.losses.npairs import first_pair_per_label, first_pair_per_label_from_labels
from deepmetric.losses.ranked_list import RankedListLoss
from deepmetric.losses.triplet import TripletMarginLoss
from deepmetric.pairwise import Batch, all_triplets, label_masks, prepare_batch
from tests.parity import assert_same_loss, pk_labels, value_and_grad
from tests.test_functional import circle_reference as circle_row_losses
from tests.test_functional import (
    generalized_lifted_reference as generalized_lifted_structure_losses,
)
from tests.test_functional import multi_similarity_reference as multi_similarity_row_losses
from tests.test_functional import ranked_list_reference as ranked_list_row_losses


# -- distances the fast path does not take: the same computation through the general path --------
class GeneralLp(distances.LpDistance):
    """:class:`LpDistance` under another name: losses and miners use their general path."""


class GeneralCosine(distances.CosineSimilarity):
    """:class:`CosineSimilarity` under another name (general path)."""


class GeneralDot(distances.DotProductSimilarity):
    """:class:`DotProductSimilarity` under another name (general path)."""


def general(distance: distances.BaseDistance) -> distances.BaseDistance:
    """The same distance, as a class the fast path does not take."""
    if isinstance(distance, distances.CosineSimilarity):
        return GeneralCosine(power=distance.power)
    if isinstance(distance, distances.DotProductSimilarity):
        return GeneralDot(normalize_embeddings=distance.normalize_embeddings, power=distance.power)
    assert isinstance(distance, distances.LpDistance)
    return GeneralLp(
        normalize_embeddings=distance.normalize_embeddings, p=distance.p, power=distance.power
    )


def _batch(n: int = 24, per_class: int = 3, dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = pk_labels(n // per_class, per_class)
    return emb, labels[torch.randperm(n, generator=g)]  # labels in no particular order


# -- 1. closed-form row gradients against autograd ---------------------------------------------

LossCore = Callable[[Tensor, Tensor, Tensor], Tensor]
RowRule = Callable[[pairwise.RowBlock], tuple[Tensor, Tensor]]


def _row_rule_cases() -> list[tuple[str, LossCore, RowRule]]:
    cos, lp = distances.CosineSimilarity(), distances.LpDistance()
    cases: list[tuple[str, LossCore, RowRule]] = []
    for name, dist in (("sim", cos), ("dist", lp)):
        cases.append(
            (
                f"multi-similarity-{name}",
                lambda m, p, n, d=dist: multi_similarity_row_losses(m, p, n, 2, 10, 0.5, d),
                lambda b, d=dist: multi_similarity_row_losses_and_grad(b, 2, 10, 0.5, d),
            )
        )
        cases.append(
            (
                f"generalized-lifted-{name}",
                lambda m, p, n, d=dist: generalized_lifted_structure_losses(m, p, n, 0.2, 0.9, d),
                lambda b, d=dist: generalized_lifted_structure_row_losses_and_grad(b, 0.2, 0.9, d),
            )
        )
    cases.append(
        (
            "circle",
            lambda m, p, n: circle_row_losses(m, p, n, 0.25, 16),
            lambda b: circle_row_losses_and_grad(b, 0.25, 16),
        )
    )
    for tp in (0.0, 1.5):
        cases.append(
            (
                f"ranked-list-Tp{tp}",
                lambda m, p, n, tp=tp: ranked_list_row_losses(m, p, n, 0.4, 1.2, 0.3, tp, 2.0),
                lambda b, tp=tp: ranked_list_row_losses_and_grad(b, 0.4, 1.2, 0.3, tp, 2.0),
            )
        )
    return cases


@pytest.mark.parametrize(("name", "core", "rule"), _row_rule_cases(), ids=lambda c: str(c)[:30])
@pytest.mark.parametrize("same_source", [True, False])
def test_row_rule_gradient_matches_autograd(
    name: str, core: LossCore, rule: RowRule, same_source: bool
) -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (9,), generator=g)
    ref_labels = labels if same_source else torch.randint(0, 4, (11,), generator=g)
    # values in (0, 1.6): inside the range where every rule has active and inactive entries
    mat = torch.rand(len(labels), len(ref_labels), generator=g, dtype=torch.float64) * 1.6
    if same_source:
        mat = (mat + mat.t()) / 2
        mat.fill_diagonal_(0)
    pos_mask, neg_mask = label_masks(labels, ref_labels, same_source)
    mat.requires_grad_(True)
    expected = core(mat, pos_mask, neg_mask)
    (expected_grad,) = torch.autograd.grad(expected.sum(), mat)
    if name == "circle":  # circle's weights are held constant: autograd of a detached copy
        expected_grad = _circle_grad(mat.detach(), pos_mask, neg_mask)
    rows, cols = torch.where(pos_mask)
    neg = None if same_source else neg_mask  # the miner-mask path, when not from labels
    block = pairwise.RowBlock(mat.detach().clone(), rows, cols, 0 if same_source else None, neg)
    losses, grad = rule(block)
    torch.testing.assert_close(losses, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def _circle_grad(mat: Tensor, pos_mask: Tensor, neg_mask: Tensor) -> Tensor:
    """Gradient of circle_row_losses with its weights held constant, by autograd."""
    mat = mat.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(circle_row_losses(mat, pos_mask, neg_mask, 0.25, 16).sum(), mat)
    return grad


# -- 2. gradcheck of the custom Functions --------------------------------------------------------

KIND_DISTANCES = {
    "euclidean": lambda: distances.LpDistance(),
    "squared-euclidean": lambda: distances.LpDistance(power=2, normalize_embeddings=False),
    "inner-product": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
}


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of one or two rows, so that every loop runs many times."""
    monkeypatch.setattr(pairwise.matrix, "BLOCK_ELEMENTS", 20)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("kind", list(KIND_DISTANCES))
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize(
    "make_loss",
    [
        lambda d: MultiSimilarityLoss(alpha=2, beta=5, base=0.3, distance=d),
        lambda d: GeneralizedLiftedStructureLoss(distance=d),
        lambda d: RankedListLoss(margin=0.5, Tn=1.5, Tp=0.5, alpha=1.5, distance=d),
        lambda d: ContrastiveLoss(pos_margin=0.1, neg_margin=1.2, distance=d),
    ],
    ids=["multi-similarity", "generalized-lifted", "ranked-list", "contrastive"],
)
def test_gradcheck_in_float64(make_loss: Any, kind: str, with_ref: bool) -> None:
    emb, labels = _batch(n=10, per_class=2, dim=4, seed=2)
    ref, ref_labels = _batch(n=8, per_class=2, dim=4, seed=3)
    loss = make_loss(KIND_DISTANCES[kind]())
    assert pairwise.fused_matrix_kind(loss.distance) is not None

    def fn(e: Tensor, r: Tensor) -> Tensor:
        if with_ref:
            return loss(e, labels, ref_emb=r, ref_labels=ref_labels)
        return loss(e, labels)

    inputs = (emb.clone().requires_grad_(True), (ref * 0.7).requires_grad_(with_ref))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("kind", list(KIND_DISTANCES))
def test_pair_distances_gradcheck_and_values(kind: str) -> None:
    emb, labels = _batch(n=10, per_class=2, dim=4, seed=4)
    ref, _ = _batch(n=7, per_class=7, dim=4, seed=5)
    ref[3] = emb[2]  # a zero distance: its gradient is 0, never NaN
    distance = KIND_DISTANCES[kind]()
    rows = torch.tensor([0, 2, 2, 5, 9, 9, 1])
    cols = torch.tensor([1, 3, 3, 0, 6, 2, 4])  # (2, 3) twice: counted twice

    def fn(e: Tensor, r: Tensor) -> Tensor:
        batch = prepare_batch(e, labels, None, r, torch.zeros(len(r), dtype=torch.long))
        return pairwise.pair_distances(distance, batch, rows, cols)

    e, r = emb.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    expected = distance.pairwise_distance(emb[rows], ref[cols])
    torch.testing.assert_close(fn(e, r), expected, rtol=1e-12, atol=1e-12)
    fn(e, r).sum().backward()
    assert e.grad is not None and bool(torch.isfinite(e.grad).all())
    if kind == "euclidean":  # away from the zero distance, the gradient is smooth
        keep = torch.tensor([0, 3, 4, 6])
        rows, cols = rows[keep], cols[keep]
    assert torch.autograd.gradcheck(fn, (e, r), eps=1e-6, atol=1e-6)


# -- 3. the fast path against the general path ---------------------------------------------------

LOSSES: dict[str, Callable[..., Any]] = {
    "multi-similarity": lambda **o: MultiSimilarityLoss(alpha=2, beta=10, base=0.4, **o),
    "generalized-lifted": lambda **o: GeneralizedLiftedStructureLoss(neg_margin=0.9, **o),
    "circle": lambda **o: CircleLoss(m=0.3, gamma=32, **o),
    "ranked-list": lambda **o: RankedListLoss(margin=0.4, Tn=2.0, Tp=1.0, **o),
    "contrastive": lambda **o: ContrastiveLoss(**({"pos_margin": 0.3, "neg_margin": 1.1} | o)),
}
SIM_MARGINS = {"contrastive": {"pos_margin": 0.8, "neg_margin": 0.2}}
DISTANCES: dict[str, Callable[[], distances.BaseDistance]] = {
    "lp": lambda: distances.LpDistance(),
    "lp-squared": lambda: distances.LpDistance(power=2),
    "lp-raw": lambda: distances.LpDistance(normalize_embeddings=False),
    "cosine": lambda: distances.CosineSimilarity(),
    "dot-raw": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
}


def _loss_pair(name: str, distance: str, **options: Any) -> tuple[Any, Any]:
    """The loss on the fast path, and the same loss on the general path."""
    if name == "circle" and distance.startswith("lp"):
        distance = "cosine"  # circle needs a similarity
    make_distance = DISTANCES[distance]
    margins = SIM_MARGINS.get(name, {}) if make_distance().is_inverted else {}
    fast = LOSSES[name](distance=make_distance(), **(margins | options))
    slow = LOSSES[name](distance=general(make_distance()), **(margins | options))
    assert pairwise.fused_matrix_kind(fast.distance) is not None
    assert pairwise.fused_matrix_kind(slow.distance) is None
    return fast, slow


def _assert_same(fast: Any, slow: Any, emb: Tensor, *args: Any, **kwargs: Any) -> None:
    v1, g1 = value_and_grad(fast, emb, *args, **kwargs)
    v2, g2 = value_and_grad(slow, emb, *args, **kwargs)
    assert abs(v1 - v2) <= 1e-9 + 1e-9 * abs(v2), (v1, v2)
    # (near-)zero distances amplify rounding: a looser absolute tolerance
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("distance", list(DISTANCES))
@pytest.mark.parametrize("block_elements", [1, 50, 1 << 17])
def test_fast_path_matches_general_path(
    name: str, distance: str, block_elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pairwise.matrix, "BLOCK_ELEMENTS", block_elements)
    emb, labels = _batch(seed=6)
    ref, ref_labels = _batch(n=15, seed=7)
    fast, slow = _loss_pair(name, distance)
    _assert_same(fast, slow, emb, labels)
    _assert_same(fast, slow, emb, labels, ref_emb=ref, ref_labels=ref_labels)


def _miner_tuples(labels: Tensor) -> list[tuple[Tensor, ...]]:
    """A triplet tuple and a pair tuple (with a repeated pair), as miners give them."""
    pos_mask, neg_mask = label_masks(labels, labels, same_source=True)
    a1, p = torch.where(pos_mask)
    a2, n = torch.where(neg_mask)
    pairs = (a1[::2], p[::2], torch.cat([a2[::9], a2[:1]]), torch.cat([n[::9], n[:1]]))
    a, p, n = all_triplets(pos_mask, neg_mask)
    return [pairs, (a[::7], p[::7], n[::7])]


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "contrastive"])
@pytest.mark.parametrize("distance", ["lp", "cosine"])
def test_fast_path_matches_general_path_with_miner_tuples(
    name: str, distance: str, small_blocks: None
) -> None:
    emb, labels = _batch(seed=8)
    fast, slow = _loss_pair(name, distance)
    for tup in _miner_tuples(labels):
        _assert_same(fast, slow, emb, labels, indices_tuple=tup)


REDUCERS: dict[str, Callable[[], reducers.BaseReducer]] = {
    "mean": reducers.MeanReducer,
    "sum": reducers.SumReducer,
    "avg-non-zero": reducers.AvgNonZeroReducer,
    "threshold": lambda: reducers.ThresholdReducer(low=0.05, high=0.6),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_fast_path_matches_general_path_with_reducers(
    name: str, reducer: str, small_blocks: None
) -> None:
    emb, labels = _batch(seed=9)
    fast, slow = _loss_pair(name, "lp", reducer=REDUCERS[reducer]())
    _assert_same(fast, slow, emb, labels)


@pytest.mark.parametrize("name", [n for n in LOSSES if n != "contrastive"])
def test_fast_path_per_row_losses_with_do_nothing_reducer(name: str) -> None:
    emb, labels = _batch(seed=10)
    fast, slow = _loss_pair(name, "lp", reducer=reducers.DoNothingReducer())
    ours, theirs = fast(emb, labels)["loss"], slow(emb, labels)["loss"]
    torch.testing.assert_close(ours["losses"], theirs["losses"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_fast_path_with_zero_distances_and_half_precision(name: str) -> None:
    emb, labels = _batch(seed=11)
    emb[5], labels[5] = emb[4], labels[4]  # a zero distance between positives
    if name != "ranked-list":  # (its negatives count only at d > 0: rounding would decide)
        emb[7] = emb[0]  # and between negatives
        assert labels[7] != labels[0]
    fast, slow = _loss_pair(name, "lp")
    _assert_same(fast, slow, emb, labels)
    v1, g1 = value_and_grad(fast, emb.half(), labels)
    v2, g2 = value_and_grad(slow, emb.half(), labels)
    assert g1.dtype == torch.float16 and bool(torch.isfinite(g1).all())
    assert abs(v1 - v2) <= 1e-5 * max(1.0, abs(v2))
    torch.testing.assert_close(g1.float(), g2.float(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(LOSSES))
def test_fast_path_without_gradients(name: str) -> None:
    emb, labels = _batch(seed=12)
    fast, slow = _loss_pair(name, "lp")
    with torch.no_grad():
        value = fast(emb, labels)
    assert not value.requires_grad
    assert float(value) == pytest.approx(float(slow(emb, labels)), rel=1e-9, abs=1e-12)


# -- 4. the blockwise miners against the whole-matrix miners ---------------------------------------

MINERS: dict[str, Callable[..., miners.BaseMiner]] = {
    "pair-margin": lambda d: miners.PairMarginMiner(pos_margin=4.0, neg_margin=6.0, distance=d),
    "pair-margin-capped": lambda d: miners.PairMarginMiner(
        pos_margin=4.0, neg_margin=6.0, max_neg_per_pos=2, distance=d
    ),
    "batch-hard": lambda d: miners.BatchHardMiner(distance=d),
    "batch-hard-ranges": lambda d: miners.BatchHardMiner(
        allowed_pos_range=(2.0, 7.0), allowed_neg_range=(3.0, 8.0), distance=d
    ),
}


@pytest.mark.parametrize("name", list(MINERS))
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("block_elements", [1, 60, 1 << 17])
def test_blockwise_miners_match_whole_matrix_miners(
    name: str, with_ref: bool, block_elements: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pairwise.matrix, "BLOCK_ELEMENTS", block_elements)
    # small integers: exact distances in both computations, and many exact ties
    g = torch.Generator().manual_seed(13)
    emb = torch.randint(-3, 4, (30, 5), generator=g).double()
    labels = torch.randint(0, 6, (30,), generator=g)
    ref = torch.randint(-3, 4, (17, 5), generator=g).double()
    ref_labels = torch.randint(0, 6, (17,), generator=g)
    args = (emb, labels, ref, ref_labels) if with_ref else (emb, labels)
    for make_distance in (
        lambda: distances.LpDistance(normalize_embeddings=False, power=2),
        lambda: distances.DotProductSimilarity(normalize_embeddings=False),
    ):
        fast, slow = MINERS[name](make_distance()), MINERS[name](general(make_distance()))
        ours, theirs = fast(*args), slow(*args)
        assert len(ours) == len(theirs)
        for mine, expected in zip(ours, theirs, strict=True):
            assert torch.equal(mine, expected)
        assert len(ours[0]) > 0


@pytest.mark.parametrize("name", list(MINERS))
def test_blockwise_miners_on_normalized_embeddings(name: str) -> None:
    emb, labels = _batch(n=40, per_class=4, dim=6, seed=14)
    margins = {"pos_margin": 0.9, "neg_margin": 1.3}
    make = (
        (lambda d: miners.PairMarginMiner(**margins, distance=d))
        if name.startswith("pair")
        else MINERS[name]
    )
    if name == "batch-hard-ranges":
        make = lambda d: miners.BatchHardMiner(  # noqa: E731
            allowed_pos_range=(0.4, 1.5), allowed_neg_range=(0.6, 1.6), distance=d
        )
    ours = make(distances.LpDistance())(emb, labels)
    theirs = make(general(distances.LpDistance()))(emb, labels)
    for mine, expected in zip(ours, theirs, strict=True):
        assert torch.equal(mine, expected)


# -- 5. the positive pairs from sorted labels --------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-3, 5), min_size=0, max_size=30),
    ref_labels=st.lists(st.integers(-3, 5), min_size=0, max_size=30),
    same_source=st.booleans(),
)
def test_same_label_pairs_match_the_label_masks(
    labels: list[int], ref_labels: list[int], same_source: bool
) -> None:
    query = torch.tensor(labels, dtype=torch.long)
    ref = query if same_source else torch.tensor(ref_labels, dtype=torch.long)
    rows, cols, counts = pairwise.same_label_pairs(query, ref, same_source)
    pos_mask, _ = label_masks(query, ref, same_source)
    expected_rows, expected_cols = torch.where(pos_mask)
    assert torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)
    assert torch.equal(counts, pos_mask.sum(dim=1))


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-3, 5), min_size=0, max_size=30),
    ref_labels=st.lists(st.integers(-3, 5), min_size=0, max_size=30),
    same_source=st.booleans(),
)
def test_npairs_first_pairs_from_labels_match_the_label_masks(
    labels: list[int], ref_labels: list[int], same_source: bool
) -> None:
    query = torch.tensor(labels, dtype=torch.long)
    ref = query if same_source else torch.tensor(ref_labels, dtype=torch.long)
    anchors, positives = first_pair_per_label_from_labels(query, ref, same_source)
    expected = first_pair_per_label(*torch.where(label_masks(query, ref, same_source)[0]), query)
    assert torch.equal(anchors, expected[0]) and torch.equal(positives, expected[1])


# -- 6. a miner's few pairs: their distances one by one --------------------------------------


def _pml_twin(ours: distances.BaseDistance) -> Any:
    """PML's distance with the same settings as ``ours``."""
    from pytorch_metric_learning import distances as pml_distances

    if isinstance(ours, distances.LpDistance):
        return pml_distances.LpDistance(power=ours.power)
    return pml_distances.CosineSimilarity()


FEW_PAIR_DISTANCES = pytest.mark.parametrize(
    "make_distance",
    [
        distances.LpDistance,
        lambda: distances.LpDistance(power=2),
        distances.CosineSimilarity,
    ],
    ids=["lp", "lp-squared", "cosine"],
)


@FEW_PAIR_DISTANCES
def test_contrastive_with_few_miner_pairs_matches_pml(make_distance: Any) -> None:
    emb, labels = _batch(n=32, per_class=4, dim=16, seed=15)
    pos_mask, neg_mask = label_masks(labels, labels, same_source=True)
    a1, p = torch.where(pos_mask)
    a2, n = torch.where(neg_mask)
    # a repeated positive pair; 10 + 1 + 20 pairs: few enough for the one-by-one path
    tup = (torch.cat([a1[:10], a1[:1]]), torch.cat([p[:10], p[:1]]), a2[::40][:20], n[::40][:20])
    batch = prepare_batch(emb, labels, tup, None, None)
    assert pairwise.few_pairs(batch, len(tup[0]) + len(tup[2]))
    ours_distance = make_distance()
    theirs_distance = _pml_twin(ours_distance)
    margins = {"pos_margin": 0.7, "neg_margin": 0.3} if ours_distance.is_inverted else {}
    assert_same_loss(
        ContrastiveLoss(distance=ours_distance, **margins),
        pml_losses.ContrastiveLoss(distance=theirs_distance, **margins),
        emb,
        labels,
        indices_tuple=tup,
    )


@FEW_PAIR_DISTANCES
@pytest.mark.parametrize("smooth_loss", [False, True])
def test_triplet_with_few_miner_triplets_matches_pml(make_distance: Any, smooth_loss: bool) -> None:
    from pytorch_metric_learning import miners as pml_miners

    emb, labels = _batch(n=128, per_class=4, dim=16, seed=16)
    # BatchHardMiner's one triplet per anchor, plus a repeated one: few enough for the
    # one-by-one path
    a, p, n = miners.BatchHardMiner()(emb, labels)
    tup = (torch.cat([a, a[:1]]), torch.cat([p, p[:1]]), torch.cat([n, n[:1]]))
    batch = prepare_batch(emb, labels, tup, None, None)
    assert pairwise.few_pairs(batch, 2 * len(tup[0]))
    assert {tuple(t) for t in torch.stack(tup[:3], 1)[:-1].tolist()} == {
        tuple(t) for t in torch.stack(pml_miners.BatchHardMiner()(emb, labels), 1).tolist()
    }
    ours_distance = make_distance()
    theirs_distance = _pml_twin(ours_distance)
    assert_same_loss(
        TripletMarginLoss(margin=0.2, smooth_loss=smooth_loss, distance=ours_distance),
        pml_losses.TripletMarginLoss(margin=0.2, smooth_loss=smooth_loss, distance=theirs_distance),
        emb,
        labels,
        indices_tuple=tup,
    )


@dataclass
class _UpperPositivesBatch(Batch):
    """A batch whose positive pairs are only those ``(i, j)`` with ``i < j``: asymmetric pairs
    with no separate reference set (what an overridden ``masks`` may give)."""

    def masks(self) -> tuple[Tensor, Tensor]:
        pos_mask, neg_mask = super().masks()
        return torch.triu(pos_mask, diagonal=1), neg_mask


@pytest.mark.parametrize("name", list(LOSSES))
def test_fast_path_respects_overridden_masks(name: str, small_blocks: None) -> None:
    emb, labels = _batch(seed=16)
    fast, slow = _loss_pair(name, "lp")

    def values(loss: Any) -> tuple[float, Tensor]:
        e = emb.clone().requires_grad_(True)
        plain = prepare_batch(e, labels, None, None, None)
        batch = _UpperPositivesBatch(**{f.name: getattr(plain, f.name) for f in fields(Batch)})
        value = loss.loss_from_batch(batch)
        value.backward()
        assert e.grad is not None
        return float(value.detach()), e.grad

    (v1, g1), (v2, g2) = values(fast), values(slow)
    assert v1 == pytest.approx(v2, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    if name != "contrastive":  # (its mean over pairs is the same over half of them, d_ij = d_ji)
        # the pairs did change: not the value of the full label masks
        assert v1 != pytest.approx(float(slow(emb, labels)), rel=1e-6)


@pytest.mark.parametrize("reducer", ["avg-non-zero", "mean", "threshold"])
@pytest.mark.parametrize(
    ("distance", "neg_margin", "kept"),
    [
        ("lp", 0.3, "none"),
        ("lp", 0.6, "few"),
        ("lp", 1.6, "many"),
        ("lp-squared", 0.36, "few"),
        ("lp-squared", 2.5, "many"),
        ("cosine", 0.7, "few"),
        ("cosine", -0.3, "many"),
    ],
)
def test_contrastive_with_none_few_or_many_kept_negatives(
    distance: str, neg_margin: float, kept: str, reducer: str
) -> None:
    # the gradient of the kept negatives: none, a list of a few, or a dense matrix product
    emb, labels = _batch(n=64, per_class=4, dim=32, seed=17)
    if kept == "few":  # three samples next to one of another class
        for i, j in ((0, 10), (20, 33), (41, 60)):
            emb[i] = emb[j] + 0.01 * emb[i]
            assert labels[i] != labels[j]
    fast, slow = _loss_pair(
        "contrastive", distance, neg_margin=neg_margin, reducer=REDUCERS[reducer]()
    )
    mat = fast.distance(emb)
    negatives = labels[:, None] != labels[None, :]
    inside = (mat > neg_margin) if fast.distance.is_inverted else (mat < neg_margin)
    n_kept = int((inside & negatives).sum())
    expected = {"none": n_kept == 0, "few": 0 < n_kept <= 64, "many": n_kept > 64}
    assert expected[kept], n_kept
    _assert_same(fast, slow, emb, labels)


@settings(max_examples=100, deadline=None)
@given(
    bound=st.one_of(
        st.floats(min_value=-2.0, max_value=1e30, allow_nan=False),
        st.sampled_from([0.0, 1.0, 0.2, 0.8, 1e-30, 1e-45, float("inf")]),
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_root_bound_decides_a_margin_before_the_square_root(
    bound: float, dtype: torch.dtype, seed: int
) -> None:
    """sqrt(x) < bound exactly when x < root_bound(bound): on the floats next to the bound on
    either side, and on random ones."""
    threshold = pairwise.root_bound(bound, dtype)
    inf = torch.tensor(float("inf"), dtype=dtype)
    near = [torch.tensor(threshold, dtype=dtype)]
    for step in (inf, -inf):
        x = near[0]
        for _ in range(40):
            x = torch.nextafter(x, step)
            near.append(x)
    g = torch.Generator().manual_seed(seed)
    scale = max(abs(threshold), 1e-30) if threshold != float("inf") else 1e30
    spread = torch.rand(200, generator=g, dtype=torch.float64) * 2 * scale
    x = torch.cat([torch.stack(near), spread.to(dtype)]).clamp_min(0)
    x = x[torch.isfinite(x)]
    torch.testing.assert_close(torch.sqrt(x) < bound, x < threshold, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_second_derivatives_raise_rather_than_being_wrong(name: str) -> None:
    emb, labels = _batch(seed=18)
    fast, _ = _loss_pair(name, "lp")
    e = emb.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(fast(e, labels), e, create_graph=True)
    (grad,) = torch.autograd.grad(fast(e, labels), e)  # first derivatives are fine
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("name", list(LOSSES))
def test_fast_path_under_autocast_computes_in_float32(name: str) -> None:
    emb, labels = _batch(seed=19)
    emb = emb.float()
    fast, slow = _loss_pair(name, "lp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v1, g1 = value_and_grad(fast, emb, labels)
    # (the reference outside autocast: the general path's backward would run in bfloat16)
    v2, g2 = value_and_grad(slow, emb, labels)
    assert v1 == pytest.approx(v2, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    miner = miners.BatchHardMiner()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mined = miner(emb, labels)
    expected = miners.BatchHardMiner(distance=general(distances.LpDistance()))(emb, labels)
    for ours, theirs in zip(mined, expected, strict=True):
        assert torch.equal(ours, theirs)
