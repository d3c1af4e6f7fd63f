"""Label masks (:mod:`deepmetric.pairwise.masks`): the positive pairs (and N-pair's first pair
per label) from sorted labels against the label masks."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepmetric import pairwise
from deepmetric.pairwise import first_pair_per_label, first_pair_per_label_from_labels, label_masks

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
