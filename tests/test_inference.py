"""Embedding datasets (:mod:`deepmetric.inference`): the one ``embed`` streaming a lazy dataset,
tensor and array datasets, and the collate function dropping unreadable items."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deepmetric import data
from deepmetric.inference import Embedded, collate_samples, embed, embed_dataset
from tests.lazy_pngs import small_model, write_pngs


def test_collate_drops_unreadable_items_and_accepts_pairs() -> None:
    x, labels, skipped = collate_samples(
        [(torch.ones(2), 1, 4), (None, 0, 7), (torch.zeros(2), 2, 9)]
    )
    assert torch.equal(x, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert labels.tolist() == [1, 2] and skipped == [7]
    x, labels, skipped = collate_samples([(torch.ones(3), torch.tensor(5))])
    assert x.shape == (1, 3) and labels.tolist() == [5] and skipped == []
    x, labels, skipped = collate_samples([(None, 0, 1)])
    assert len(x) == 0 and len(labels) == 0 and skipped == [1]


# -- embed ----------------------------------------------------------------------------------------


def test_embed_streams_a_lazy_dataset_and_reports_the_rows_it_kept(tmp_path: Path) -> None:
    lazy = write_pngs(tmp_path / "pngs", range(3), 5, broken=6)
    model = small_model().eval()
    readable = [i for i in range(len(lazy)) if i != 6]
    with torch.no_grad():
        expected = torch.cat([model(lazy.decode(i).unsqueeze(0)) for i in readable])  # type: ignore[union-attr]
    for workers in (0, 2):
        with pytest.warns(UserWarning, match=str(lazy.paths[6].name)):
            result = embed_dataset(model, lazy, batch_size=4, num_workers=workers)
        assert isinstance(result, Embedded)
        assert result.kept_indices.tolist() == readable
        assert result.skipped_indices == [6]
        assert result.labels is not None and torch.equal(result.labels, lazy.labels[readable])
        torch.testing.assert_close(result.embeddings, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="embed_dataset"), pytest.warns(UserWarning):
        embed(model, lazy)


def test_embed_of_a_tensor_or_array_dataset_matches_the_model_in_eval_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    model.train()
    x = torch.randn(37, 1, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    torch.testing.assert_close(embed(model, x, batch_size=8), expected)
    assert model.training  # the mode is restored
    dataset = data.ArrayDataset(x, torch.arange(37) % 3)
    result = embed_dataset(model, dataset, 5, indices=[3, 30, 1])
    torch.testing.assert_close(result.embeddings, expected[[3, 30, 1]])
    assert result.labels is not None and result.labels.tolist() == [0, 0, 1]
    assert embed(model, dataset, progress=True).dtype == torch.float32
