"""Embedding networks (:mod:`deepmetric.models.nets`): shapes, heads, shared weights."""

from __future__ import annotations

import pytest
import torch

from deepmetric import models


@pytest.mark.parametrize("size", [8, 28, 33])
def test_small_convnet_handles_small_and_odd_sizes(size: int) -> None:
    net = models.SmallConvNet(in_channels=1, channels=16)
    out = net(torch.randn(3, 1, size, size))
    assert out.shape == (3, 16)


def test_embedding_net_head_and_normalisation() -> None:
    trunk = models.SmallConvNet(channels=16)
    net = models.EmbeddingNet(trunk, 16, embedding_size=8, hidden=(32,), batch_norm=True)
    x = torch.randn(5, 1, 28, 28)
    emb = net(x)
    assert emb.shape == (5, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(net.embed_features(net.features(x)), emb)
    raw = models.EmbeddingNet(trunk, 16, embedding_size=8, normalize=False)
    assert not torch.allclose(raw(x).norm(dim=1), torch.ones(5))


def test_siamese_and_triplet_networks_share_weights() -> None:
    net = models.EmbeddingNet(torch.nn.Flatten(), 12, embedding_size=4).eval()
    a, b, c = torch.randn(2, 3, 4), torch.randn(3, 3, 4), torch.randn(1, 3, 4)
    e1, e2 = models.SiameseNetwork(net)(a, b)
    torch.testing.assert_close(e1, net(a))
    torch.testing.assert_close(e2, net(b))
    ea, ep, en = models.TripletNetwork(net)(a, b, c)
    torch.testing.assert_close(en, net(c))
    assert ep.shape == (3, 4)
