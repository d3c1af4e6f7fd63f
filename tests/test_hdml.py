"""HDML (Zheng, Chen, Lu & Zhou, CVPR 2019): the interpolation, gradient routing, the schedule,
state, parameter groups, edge cases and validation (its N-pair tuplet loss is tested in
tests/losses/test_tuplet_npairs.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from deepmetric.hdml import (
    HDML,
    HDMLGenerator,
    TupletNPairsLoss,
    decay_factor,
    hardness_aware_negatives,
)
from deepmetric.losses.contrastive import ContrastiveLoss
from deepmetric.losses.npairs import NPairsLoss
from deepmetric.losses.triplet import TripletMarginLoss
from tests.parity import pk_labels

# -- the interpolation --------------------------------------------------------------------------


def loop_negatives(
    anchor: Tensor, positive: Tensor, negative: Tensor, j_avg: float, alpha: float
) -> Tensor:
    """The paper's formula, one row at a time, in plain Python floats."""
    out = []
    factor = math.exp(-alpha / j_avg)
    for z, zp, zn in zip(anchor.tolist(), positive.tolist(), negative.tolist(), strict=True):
        d_pos = math.dist(z, zp)
        d_neg = math.dist(z, zn)
        if d_pos < d_neg:
            lam = (d_pos + (d_neg - d_pos) * factor) / d_neg
            out.append([a + lam * (n - a) for a, n in zip(z, zn, strict=True)])
        else:
            out.append(list(zn))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("j_avg, alpha", [(0.5, 7.0), (3.0, 1.0), (100.0, 90.0), (0.05, 0.1)])
def test_interpolation_matches_per_row_formula(j_avg: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(50, 6, generator=g, dtype=torch.float64) for _ in range(3))
    p = a + 0.5 * (p - a)  # mix rows with d+ < d- and rows with d+ >= d-
    ours = hardness_aware_negatives(a, p, n, j_avg, alpha)
    torch.testing.assert_close(ours, loop_negatives(a, p, n, j_avg, alpha), rtol=1e-12, atol=1e-12)


def test_interpolation_float32_and_tensor_j_avg() -> None:
    g = torch.Generator().manual_seed(1)
    a, p, n = (torch.randn(20, 4, generator=g) for _ in range(3))
    ours = hardness_aware_negatives(a, p, n, torch.tensor(0.7), 2.0)
    assert ours.dtype == torch.float32
    ref = loop_negatives(a.double(), p.double(), n.double(), 0.7, 2.0)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_negative_not_farther_than_positive_is_unchanged() -> None:
    a = torch.zeros(3, 2, dtype=torch.float64)
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]], dtype=torch.float64)
    n = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, -5.0]], dtype=torch.float64)  # d- <= d+
    for j_avg in (0.0, 0.1, 1e6, math.inf):
        out = hardness_aware_negatives(a, p, n, j_avg, 7.0)
        assert torch.equal(out, n)


def test_zero_negative_distance_is_finite_with_finite_gradient() -> None:
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[1.0, 2.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    n = a.detach().clone().requires_grad_(True)  # d- = 0 (and d+ = 0 on row 0)
    out = hardness_aware_negatives(a, p, n, 0.5, 7.0)
    torch.testing.assert_close(out, n.detach())
    out.sum().backward()
    for t in (a, p, n):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_zero_positive_distance_pulls_onto_anchor_finitely() -> None:
    a = torch.tensor([[1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    p = a.detach().clone().requires_grad_(True)  # d+ = 0
    n = torch.tensor([[4.0, 5.0]], dtype=torch.float64, requires_grad=True)
    out = hardness_aware_negatives(a, p, n, 0.0, 7.0)  # j_avg -> 0: distance d+ = 0
    torch.testing.assert_close(out, a.detach())
    out.sum().backward()
    for t in (a, p, n):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("j_avg", [0.0, 1e-30, 1e-3, 0.5, 5.0, 1e3, 1e30, math.inf])
def test_synthetic_negative_on_segment_between_d_pos_and_d_neg(j_avg: float) -> None:
    g = torch.Generator().manual_seed(2)
    a, n = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 5, generator=g)
    n = n.double() * 3
    p = a + 0.2 * torch.randn(40, 5, generator=g, dtype=torch.float64)
    d_pos = (p - a).norm(dim=1)
    d_neg = (n - a).norm(dim=1)
    assert bool((d_pos < d_neg).all())
    out = hardness_aware_negatives(a, p, n, j_avg, 7.0)
    assert torch.isfinite(out).all()
    d_new = (out - a).norm(dim=1)
    assert bool((d_new >= d_pos - 1e-9).all()) and bool((d_new <= d_neg + 1e-9).all())
    # on the segment: out - a is a non-negative multiple of n - a
    t = ((out - a) * (n - a)).sum(dim=1) / d_neg**2
    torch.testing.assert_close(out, a + t.unsqueeze(1) * (n - a))
    assert bool((t >= 0).all()) and bool((t <= 1 + 1e-12).all())
    if j_avg <= 1e-3:  # exp(-7000) = 0: all the way to distance d+
        torch.testing.assert_close(d_new, d_pos)
    if j_avg >= 1e30:  # exp(-7e-30) = 1: unchanged
        torch.testing.assert_close(out, n)


def test_alpha_zero_leaves_negatives_unchanged_even_at_zero_j_avg() -> None:
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(8, 3, generator=g) for _ in range(3))
    torch.testing.assert_close(hardness_aware_negatives(a, p, n, 0.0, 0.0), n)


def test_decay_factor_limits_and_validation() -> None:
    like = torch.zeros(())
    assert float(decay_factor(7.0, 0.0, like)) == 0.0
    assert float(decay_factor(7.0, math.inf, like)) == 1.0
    assert float(decay_factor(0.0, 0.0, like)) == 1.0
    assert float(decay_factor(1.0, 1.0, like)) == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError, match="running mean"):
        decay_factor(1.0, -1.0, like)
    with pytest.raises(ValueError, match="running mean"):
        decay_factor(1.0, math.nan, like)
    with pytest.raises(ValueError, match="scale"):
        decay_factor(-1.0, 1.0, like)


def test_interpolation_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same"):
        hardness_aware_negatives(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, 2), 1.0, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        hardness_aware_negatives(torch.zeros(3), torch.zeros(3), torch.zeros(3), 1.0, 1.0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 64),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    j_avg=st.sampled_from([0.0, 1e-3, 1.0, 1e6, math.inf]),
    duplicates=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_interpolation_always_finite(
    n: int, scale: float, j_avg: float, duplicates: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    a, p, neg = (scale * torch.randn(n, 4, generator=g) for _ in range(3))
    if duplicates:
        p[: n // 2] = a[: n // 2]
        neg[n // 3 :] = a[n // 3 :]
    a, p, neg = (t.requires_grad_(True) for t in (a, p, neg))
    out = hardness_aware_negatives(a, p, neg, j_avg, 7.0)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for t in (a, p, neg):
        assert t.grad is not None and torch.isfinite(t.grad).all()


# -- the HDML module ------------------------------------------------------------------------------

FEATURES, EMBEDDING, CLASSES = 12, 6, 5


class Net(nn.Module):
    """Trunk + head, with access to both (as EmbeddingNet provides)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, EMBEDDING)


def make(loss: nn.Module, seed: int = 0, **kwargs: object) -> tuple[Net, HDML]:
    torch.manual_seed(seed)
    net = Net()
    hdml = HDML(net.head, loss, FEATURES, EMBEDDING, CLASSES, **kwargs)  # type: ignore[arg-type]
    return net, hdml


def batch(seed: int = 0, per_class: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = pk_labels(CLASSES, per_class)
    return torch.randn(len(labels), 8, generator=g), labels


def losses_of(net: Net, hdml: HDML, x: Tensor, y: Tensor):  # noqa: ANN201
    features = net.trunk(x)
    return hdml.step_losses(features, net.head(features), y)


def grads(module: nn.Module) -> list[Tensor | None]:
    return [p.grad for p in module.parameters()]


def nonzero(gs: list[Tensor | None]) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in gs)


def is_none_or_zero(gs: list[Tensor | None]) -> bool:
    return all(g is None or not bool(g.any()) for g in gs)


@pytest.mark.parametrize("loss", [TripletMarginLoss(margin=0.2), NPairsLoss()], ids=str)
def test_gradients_reach_only_the_intended_parts(loss: nn.Module) -> None:
    net, hdml = make(loss)
    x, y = batch()
    # metric loss: trunk and head, never the generator or classifier
    out = losses_of(net, hdml, x, y)
    assert float(out.synthetic_weight) > 0 and out.num_synthetic > 0
    out.metric_loss.backward()
    assert nonzero(grads(net.trunk)) and nonzero(grads(net.head))
    assert all(g is None for g in grads(hdml.generator) + grads(hdml.classifier))
    # generator loss: the generator only
    net.zero_grad(set_to_none=True)
    out = losses_of(net, hdml, x, y)
    out.generator_loss.backward()
    assert nonzero(grads(hdml.generator))
    assert all(g is None for g in grads(net) + grads(hdml.classifier))
    # classifier loss: the classifier only
    hdml.zero_grad(set_to_none=True)
    out = losses_of(net, hdml, x, y)
    out.classifier_loss.backward()
    assert nonzero(grads(hdml.classifier))
    assert all(g is None for g in grads(net) + grads(hdml.generator))


def test_total_backward_equals_three_separate_backwards() -> None:
    net, hdml = make(TripletMarginLoss(margin=0.2))
    hdml.eval()  # keep the running means fixed between the two computations
    x, y = batch(1)
    torch.manual_seed(7)
    losses_of(net, hdml, x, y).total().backward()
    together = [p.grad.clone() for p in [*net.parameters(), *hdml.parameters()]]  # type: ignore[union-attr]
    for part in (net, hdml):
        part.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    out = losses_of(net, hdml, x, y)
    separate = {}
    for loss, params in (
        (out.metric_loss, list(net.parameters())),
        (out.generator_loss, list(hdml.generator.parameters())),
        (out.classifier_loss, list(hdml.classifier.parameters())),
    ):
        for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True), strict=True):
            separate[id(p)] = g
    for p, g in zip([*net.parameters(), *hdml.parameters()], together, strict=True):
        torch.testing.assert_close(g, separate[id(p)])


def test_metric_gradient_flows_through_the_frozen_generator_to_the_trunk() -> None:
    net, hdml = make(TripletMarginLoss(margin=0.5), beta=1e12)  # w = 0: J_metric = J_syn
    x, y = batch(2)
    out = losses_of(net, hdml, x, y)
    assert float(out.synthetic_weight) == pytest.approx(1.0)
    out.metric_loss.backward()
    assert nonzero(grads(net.trunk))
    assert all(g is None for g in grads(hdml.generator))


@pytest.mark.parametrize(
    "loss",
    [TripletMarginLoss(margin=0.2), NPairsLoss(), ContrastiveLoss()],
    ids=["triplet", "npairs", "contrastive"],
)
def test_one_training_step_is_finite_and_changes_all_parts(loss: nn.Module) -> None:
    net, hdml = make(loss, window=1)
    optimizer = torch.optim.Adam(hdml.parameter_groups(net, metric_lr=1e-2))
    before = [p.detach().clone() for p in [*net.parameters(), *hdml.parameters()]]
    x, y = batch(3)
    out = losses_of(net, hdml, x, y)
    for value in (out.metric_loss, out.generator_loss, out.classifier_loss, out.j_syn):
        assert torch.isfinite(value)
    optimizer.zero_grad()
    out.total().backward()
    optimizer.step()
    after = [p.detach() for p in [*net.parameters(), *hdml.parameters()]]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(torch.isfinite(a).all() for a in after)
    # second step uses the updated running means (window=1) and stays finite
    out = losses_of(net, hdml, x, y)
    assert float(hdml.j_avg) < 1e6 and torch.isfinite(out.total())


def test_npairs_synthesis_layout_and_default_alpha() -> None:
    _, hdml = make(NPairsLoss())
    assert hdml.alpha == 90.0 and isinstance(hdml.synthetic_loss, TupletNPairsLoss)
    _, hdml_t = make(TripletMarginLoss())
    assert hdml_t.alpha == 7.0 and hdml_t.synthetic_loss is hdml_t.metric_loss
    labels = torch.tensor([2, 0, 2, 1, 0, 1, 2])
    a, p, n = hdml.synthesis_triplets(labels)
    # one pair per label (the first: (0, 2) for 2, (1, 4) for 0, (3, 5) for 1), negatives the
    # other pairs' positives
    pairs = {0: (1, 4), 1: (3, 5), 2: (0, 2)}
    expected = {(pairs[c][0], pairs[c][1], pairs[d][1]) for c in pairs for d in pairs if c != d}
    assert set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == expected


def test_synthesis_triplets_from_miner_and_all() -> None:
    _, hdml = make(TripletMarginLoss(), triplets_per_anchor="all")
    labels = pk_labels(3, 2)
    a, p, n = hdml.synthesis_triplets(labels)
    assert len(a) == 6 * 1 * 4
    assert bool((labels[a] == labels[p]).all()) and bool((labels[a] != labels[n]).all())
    mined = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([4, 5]))
    a, p, n = hdml.synthesis_triplets(labels, mined)
    assert (a.tolist(), p.tolist(), n.tolist()) == ([0, 2], [1, 3], [4, 5])
    _, hdml_r = make(TripletMarginLoss(), triplets_per_anchor=3)
    a, p, n = hdml_r.synthesis_triplets(labels)
    assert len(a) == 18 and bool((labels[a] != labels[n]).all())


def test_synthetic_loss_equals_loss_on_concatenated_batch() -> None:
    """J_syn with queries/references equals the metric loss on the concatenated batch."""
    loss = TripletMarginLoss(margin=0.3)
    net, hdml = make(loss, beta=0.0)  # w = 1: J_metric = J_m, J_syn still reported
    hdml.eval()
    x, y = batch(4)
    torch.manual_seed(11)
    out = losses_of(net, hdml, x, y)
    torch.manual_seed(11)
    with torch.no_grad():
        features = net.trunk(x)
        z = net.head(features)
        a, p, n = hdml.synthesis_triplets(y)
        pulled = hardness_aware_negatives(z[a], z[p], z[n], hdml.j_avg, hdml.alpha)
        syn = net.head(hdml.generator(torch.cat([z, pulled])))
        t = torch.arange(len(y), len(y) + len(n))
        expected = loss(syn, torch.cat([y, y[n]]), (a, p, t))
    assert float(out.j_syn) == pytest.approx(float(expected), rel=1e-5)


def test_metric_loss_is_the_scheduled_mixture() -> None:
    net, hdml = make(TripletMarginLoss(margin=0.3))
    hdml.eval()
    hdml.j_gen.fill_(2e4)
    x, y = batch(5)
    out = losses_of(net, hdml, x, y)
    w = math.exp(-1e4 / 2e4)
    assert float(out.synthetic_weight) == pytest.approx(1 - w, rel=1e-6)
    expected = w * float(out.j_m) + (1 - w) * float(out.j_syn)
    assert float(out.metric_loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.generator_loss.detach()) == pytest.approx(
        float(out.j_recon) + 0.5 * float(out.j_soft), rel=1e-6
    )


def test_running_means_update_once_per_window() -> None:
    net, hdml = make(TripletMarginLoss(margin=0.3), window=3, initial_mean=50.0)
    assert float(hdml.j_avg) == 50.0 and float(hdml.j_gen) == 50.0
    history = []
    for step in range(7):
        x, y = batch(10 + step)
        out = losses_of(net, hdml, x, y)
        history.append((float(out.j_m), float(out.generator_loss.detach())))
        if step < 2:
            assert float(hdml.j_avg) == 50.0 and int(hdml.window_count) == step + 1
    m1 = sum(h[0] for h in history[:3]) / 3
    m2 = sum(h[0] for h in history[3:6]) / 3
    g2 = sum(h[1] for h in history[3:6]) / 3
    assert int(hdml.window_count) == 1
    assert float(hdml.j_avg) == pytest.approx(m2, rel=1e-5)
    assert float(hdml.j_gen) == pytest.approx(g2, rel=1e-5)
    assert m1 != pytest.approx(m2)
    # eval mode and non-finite values do not count
    hdml.eval()
    losses_of(net, hdml, *batch(99))
    hdml.train()
    hdml.update_running_means(math.nan, 1.0)
    hdml.update_running_means(1.0, math.inf)
    assert int(hdml.window_count) == 1


def test_state_dict_round_trip_resumes_exactly() -> None:
    net, hdml = make(TripletMarginLoss(margin=0.3), window=4)
    for step in range(6):
        losses_of(net, hdml, *batch(20 + step))
    buffer = io.BytesIO()
    torch.save({"net": net.state_dict(), "hdml": hdml.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert {"j_avg", "j_gen", "window_sum_m", "window_sum_gen", "window_count"} <= set(
        state["hdml"]
    )
    net2, hdml2 = make(TripletMarginLoss(margin=0.3), seed=123, window=4)
    net2.load_state_dict(state["net"])
    hdml2.load_state_dict(state["hdml"])
    for name, value in hdml.state_dict().items():
        assert torch.equal(value, hdml2.state_dict()[name]), name
    torch.manual_seed(5)
    out1 = losses_of(net, hdml, *batch(40))
    torch.manual_seed(5)
    out2 = losses_of(net2, hdml2, *batch(40))
    assert float(out1.total().detach()) == float(out2.total().detach())
    assert torch.equal(hdml.j_avg, hdml2.j_avg) and torch.equal(
        hdml.window_count, hdml2.window_count
    )


def test_parameter_groups() -> None:
    net, hdml = make(TripletMarginLoss())
    groups = hdml.parameter_groups(net, metric_lr=1e-3)
    assert [g["name"] for g in groups] == ["metric", "generator", "classifier"]
    assert [g["lr"] for g in groups] == [1e-3, 1e-2, 1e-3]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(p) for p in net.parameters()}
    assert ids[1] == {id(p) for p in hdml.generator.parameters()}
    assert ids[2] == {id(p) for p in hdml.classifier.parameters()}
    with pytest.raises(ValueError, match="generator or classifier"):
        hdml.parameter_groups(nn.ModuleList([net, hdml]), metric_lr=1e-3)
    # the head is not registered in HDML: its parameters are the model's, not HDML's
    assert not ({id(p) for p in net.head.parameters()} & {id(p) for p in hdml.parameters()})


def test_edge_batches_are_finite() -> None:
    for loss in (TripletMarginLoss(margin=0.2), NPairsLoss()):
        net, hdml = make(loss)
        for y in (torch.zeros(4, dtype=torch.long), torch.arange(5), torch.tensor([3])):
            x = torch.randn(len(y), 8)
            out = losses_of(net, hdml, x, y)
            assert out.num_synthetic == 0
            out.total().backward()
            for p in [*net.parameters(), *hdml.parameters()]:
                assert p.grad is None or torch.isfinite(p.grad).all()


def test_validation() -> None:
    net, hdml = make(TripletMarginLoss())
    x, y = batch()
    f = net.trunk(x)
    with pytest.raises(ValueError, match="feature_size"):
        hdml.step_losses(torch.zeros(len(y), FEATURES + 1), net.head(f), y)
    with pytest.raises(ValueError, match="embedding_size"):
        hdml.step_losses(f, torch.zeros(len(y), EMBEDDING + 1), y)
    with pytest.raises(ValueError, match="num_classes"):
        hdml.step_losses(f, net.head(f), y + CLASSES)
    with pytest.raises(ValueError, match="rows"):
        hdml.step_losses(f[:-1], net.head(f), y)
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        make(TripletMarginLoss(), triplets_per_anchor=0)
    with pytest.raises(ValueError, match="beta"):
        make(TripletMarginLoss(), beta=-1.0)
    with pytest.raises(ValueError, match="window"):
        make(TripletMarginLoss(), window=0)


def test_generator_frozen_forward_matches_and_blocks_weight_gradients() -> None:
    gen = HDMLGenerator(4, 7, hidden_size=9)
    z = torch.randn(5, 4, requires_grad=True)
    live, frozen = gen(z), gen(z, frozen=True)
    torch.testing.assert_close(live, frozen)
    frozen.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.parameters())


def test_step_with_a_miners_pairs_uses_their_triplets() -> None:
    net, hdml = make(TripletMarginLoss(margin=0.2))
    x, y = batch(6)  # labels 0,0,0,1,1,1,...
    pairs = (
        torch.tensor([0, 3]),
        torch.tensor([1, 4]),
        torch.tensor([0, 0, 3]),
        torch.tensor([5, 9, 0]),
    )
    out = hdml.step_losses(net.trunk(x), net.head(net.trunk(x)), y, pairs)
    assert out.num_synthetic == 3  # (0,1,5), (0,1,9), (3,4,0)
    assert torch.isfinite(out.total())
    out.total().backward()
    assert nonzero(grads(net.trunk)) and nonzero(grads(hdml.generator))
