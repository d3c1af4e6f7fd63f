"""What every loss checks before computing (:mod:`deepmetric.losses.base`): reference sets and
index tuples, devices, dtypes, and embeddings whose squared distances would overflow."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric import distances, losses, miners


def test_bad_ref_and_indices_are_value_errors() -> None:
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    loss = losses.TripletMarginLoss()
    with pytest.raises(ValueError, match="dimension"):
        loss(emb, labels, ref_emb=torch.randn(4, 2), ref_labels=labels)
    with pytest.raises(ValueError, match="ref_labels are required"):
        loss(emb, labels, ref_emb=torch.randn(4, 3))
    with pytest.raises(ValueError, match="outside"):
        loss(emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([1]), torch.tensor([9])))
    with pytest.raises(ValueError, match="3 .* or 4"):
        loss(emb, labels, indices_tuple=(torch.tensor([0]), torch.tensor([1])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="device|on cuda|on cpu"):
        losses.TripletMarginLoss()(torch.randn(4, 3, device="cuda"), torch.tensor([0, 0, 1, 1]))


def test_a_reference_set_in_another_dtype_is_a_value_error() -> None:
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(
        ValueError, match="ref_emb is torch.float64 but embeddings are torch.float32"
    ):
        losses.TripletMarginLoss()(emb, labels, ref_emb=emb.double(), ref_labels=labels)


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    exponent=st.integers(-30, 300),
    dim=st.sampled_from([2, 16, 128]),
    name=st.sampled_from(["ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss"]),
    miner=st.booleans(),
)
def test_any_dtype_and_scale_gives_a_finite_loss_or_a_value_error(
    dtype: torch.dtype, exponent: int, dim: int, name: str, miner: bool
) -> None:
    """Embeddings of every floating dtype at scales from 1e-30 to 1e300: either refused with a
    ValueError naming the problem, or a finite loss and gradient; a refusal happens exactly
    when the squared distances would overflow the dtype they are computed in."""
    g = torch.Generator().manual_seed(exponent * 7 + dim)
    raw = torch.randn(12, dim, generator=g, dtype=torch.float64) * 10.0**exponent
    labels = torch.arange(12) % 3
    if not torch.isfinite(raw.to(dtype)).all():
        return  # not representable in this dtype at all: nothing reaches the loss
    emb = raw.to(dtype).requires_grad_(True)
    computed = torch.float64 if dtype == torch.float64 else torch.float32
    largest = float(emb.detach().abs().max())
    limit = math.log(torch.finfo(computed).max)
    overflows = largest > 0 and 2 * math.log(largest) + math.log(4 * dim) >= limit
    distance = distances.LpDistance(normalize_embeddings=False)
    loss_fn = getattr(losses, name)(distance=distance)
    try:
        tuples = miners.MultiSimilarityMiner(distance=distance)(emb, labels) if miner else None
        value = loss_fn(emb, labels, tuples)
    except ValueError as error:
        assert overflows, f"refused without overflow: {error}"
        assert "overflow" in str(error)
        return
    assert not overflows
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(emb.grad.float()).all()
