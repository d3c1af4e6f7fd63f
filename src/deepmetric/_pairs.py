"""Label masks and index tuples: moved to :mod:`deepmetric.pairwise.masks` (the pair engine);
these names stay importable from here."""

from .pairwise.masks import (
    CHUNK_ELEMENTS,
    all_triplets,
    label_masks,
    masks_from_indices,
    pairs_from_masks,
    pairs_to_triplets,
    positive_pair_chunks,
    random_triplets,
    sample_in_rows,
    to_pairs,
    triplets_from_masks,
)

__all__ = [
    "CHUNK_ELEMENTS",
    "all_triplets",
    "label_masks",
    "masks_from_indices",
    "pairs_from_masks",
    "pairs_to_triplets",
    "positive_pair_chunks",
    "random_triplets",
    "sample_in_rows",
    "to_pairs",
    "triplets_from_masks",
]
