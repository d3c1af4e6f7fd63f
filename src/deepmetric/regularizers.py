"""Embedding regularizers, passed to a loss as ``embedding_regularizer=`` (PML's convention)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .reducers import BaseReducer, MeanReducer


class LpRegularizer(nn.Module):
    """Penalise the L``p`` norm of each embedding (raised to ``power``), reduced by ``reducer``
    (mean by default). ``loss(..., embedding_regularizer=LpRegularizer(), embedding_reg_weight=w)``
    adds ``w * mean_i ||x_i||_p`` to the loss."""

    def __init__(self, p: float = 2, power: float = 1, reducer: BaseReducer | None = None) -> None:
        super().__init__()
        self.p = p
        self.power = power
        self.reducer = MeanReducer() if reducer is None else reducer

    def forward(self, embeddings: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(embeddings.float(), ord=self.p, dim=1)
        if self.power != 1:
            norms = norms**self.power
        indices = torch.arange(len(embeddings), device=embeddings.device)
        info = {"losses": norms, "indices": indices, "reduction_type": "element"}
        return self.reducer({"loss": info}, embeddings)
