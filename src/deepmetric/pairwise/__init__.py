"""The pair engine: what every pair-based loss and miner computes on, in one place.

A loss or a miner compares ``(B, D)`` queries with ``(R, D)`` references (the queries themselves,
a cross-batch memory, another rank's shard) through the ``(B, R)`` matrix of a distance, and
through the pairs its labels or a miner's tuple define. This package holds:

* :mod:`~deepmetric.pairwise.batch`: the validated inputs (:class:`Batch`, :func:`prepare_batch`);
* :mod:`~deepmetric.pairwise.masks`: label masks, index tuples and triplet enumeration, in
  bounded chunks;
* :mod:`~deepmetric.pairwise.matrix`: the matrix of the *fusable* distances (Euclidean, squared
  Euclidean, inner products: :func:`fused_matrix_kind`) one block of rows or tile at a time,
  and the comparisons made on it before any square root (:func:`closer_than`);
* :mod:`~deepmetric.pairwise.blocks`: a batch's pairs served by blocks of rows or tiles,
  without any ``(B, R)`` mask built from labels (:class:`PairBlocks`, :class:`RowBlock`);
* :mod:`~deepmetric.pairwise.gradients`: the embeddings' gradient of a weighted sum over the
  matrix, for the Euclidean and the inner-product kinds: dense, by blocks, or from a list;
* :mod:`~deepmetric.pairwise.rows`: per-row losses with the closed-form gradient a row rule
  states, for any distance (:func:`row_losses`);
* :mod:`~deepmetric.pairwise.pair_losses`: term rules over a batch's positive and negative
  pairs, listed or by blocks (:func:`pair_losses`);
* :mod:`~deepmetric.pairwise.triplets`: a triplet rule over a batch's triplets, listed or
  streamed (:func:`triplet_losses`), and a separable one over all of them without visiting
  them (:func:`separable_triplet_losses`);
* :mod:`~deepmetric.pairwise.positive_pairs`: a formula of each positive pair over the whole
  matrix and the negatives of its rows (:func:`positive_pair_losses`);
* :mod:`~deepmetric.pairwise.npairs`: one positive pair per label and a row rule over their own
  matrix (:func:`npairs_losses`);
* :mod:`~deepmetric.pairwise.listed`: the distances of a few listed pairs without the matrix
  (:func:`pair_distances`).

A loss hands the engine its formula (a rule of :mod:`deepmetric.functional`) and the engine
picks the computation: blocks, tiles and closed-form embedding gradients for the fusable
distances; for any other distance the same rule on the distance's whole matrix, or on the
listed entries, with the gradient reaching the embeddings through the distance's autograd.
The rules' gradients are first-order only: a backward pass asked to build a graph
(``create_graph=True``) raises rather than return a wrong one. Nothing here imports
:mod:`deepmetric.losses`, :mod:`deepmetric.functional` or :mod:`deepmetric.miners`: they
import it (and it imports :mod:`deepmetric.reducers`, whose streams its paths feed).
"""

from .batch import (
    Batch,
    prepare_batch,
)
from .blocks import (
    PairBlocks,
    RowBlock,
    pair_blocks_to_learn_from,
    pairs_are_the_labels,
)
from .gradients import (
    add_block_embedding_grads_,
    add_pair_embedding_grads_,
    elementwise_terms,
    embedding_grads,
    embedding_weight_,
    first_order_only,
    sparse_product,
)
from .listed import (
    PAIR_CHUNK_ELEMENTS,
    PAIR_COST_IN_ENTRIES,
    few_pairs,
    pair_chunks,
    pair_distances,
)
from .masks import (
    CHUNK_ELEMENTS,
    all_triplets,
    at_most_one_pair_each,
    label_masks,
    masks_from_indices,
    pairs_from_masks,
    pairs_to_triplets,
    positive_pair_chunks,
    random_triplets,
    same_label_pairs,
    sample_in_rows,
    to_pairs,
    triplets_from_masks,
)
from .matrix import (
    ACCELERATOR_BLOCK_ELEMENTS,
    BLOCK_ELEMENTS,
    MatrixBlocks,
    MatrixKind,
    as_compared,
    closer_than,
    compute_dtype,
    cpu_block_elements,
    distances_,
    full_precision,
    fused_matrix_kind,
    matrix_to_unit_reference,
    normalized_inputs,
    root_bound,
    row_blocks,
)
from .npairs import (
    first_pair_per_label,
    first_pair_per_label_from_labels,
    npairs_losses,
)
from .pair_losses import (
    PairLoss,
    PairRule,
    pair_losses,
)
from .positive_pairs import (
    PositivePairRule,
    pair_counts,
    positive_pair_losses,
    positive_pairs_and_negative_weights,
)
from .rows import (
    RowRule,
    masked_logsumexp,
    matrix_row_losses,
    row_losses,
    row_softmax_,
    sparse_softmax,
)
from .triplets import (
    HalvesRule,
    SeparableTriplets,
    TripletRule,
    kept_triplet_counts,
    separable_triplet_losses,
    triplet_losses,
)

__all__ = [
    "ACCELERATOR_BLOCK_ELEMENTS",
    "BLOCK_ELEMENTS",
    "Batch",
    "CHUNK_ELEMENTS",
    "HalvesRule",
    "MatrixBlocks",
    "MatrixKind",
    "PAIR_CHUNK_ELEMENTS",
    "PAIR_COST_IN_ENTRIES",
    "PairBlocks",
    "PairLoss",
    "PairRule",
    "PositivePairRule",
    "RowBlock",
    "RowRule",
    "SeparableTriplets",
    "TripletRule",
    "add_block_embedding_grads_",
    "add_pair_embedding_grads_",
    "all_triplets",
    "as_compared",
    "at_most_one_pair_each",
    "closer_than",
    "compute_dtype",
    "cpu_block_elements",
    "distances_",
    "elementwise_terms",
    "embedding_grads",
    "embedding_weight_",
    "few_pairs",
    "first_pair_per_label",
    "first_pair_per_label_from_labels",
    "first_order_only",
    "full_precision",
    "fused_matrix_kind",
    "kept_triplet_counts",
    "label_masks",
    "masked_logsumexp",
    "masks_from_indices",
    "matrix_row_losses",
    "matrix_to_unit_reference",
    "npairs_losses",
    "normalized_inputs",
    "pair_blocks_to_learn_from",
    "pair_chunks",
    "pair_counts",
    "pair_distances",
    "pair_losses",
    "pairs_are_the_labels",
    "pairs_from_masks",
    "pairs_to_triplets",
    "positive_pair_chunks",
    "positive_pair_losses",
    "positive_pairs_and_negative_weights",
    "prepare_batch",
    "random_triplets",
    "root_bound",
    "row_blocks",
    "row_losses",
    "row_softmax_",
    "same_label_pairs",
    "sample_in_rows",
    "separable_triplet_losses",
    "sparse_product",
    "sparse_softmax",
    "to_pairs",
    "triplet_losses",
    "triplets_from_masks",
]
