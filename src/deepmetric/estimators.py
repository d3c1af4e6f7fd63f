"""scikit-learn interoperability: a trained embedding model as a scikit-learn transformer.

:class:`EmbeddingTransformer` wraps any ``torch.nn.Module`` so that a metric-learning model
feeds scikit-learn directly::

    pipe = make_pipeline(EmbeddingTransformer(model, input_shape=(1, 8, 8)), SVC())
    pipe.fit(X_train, y_train).score(X_test, y_test)

It follows scikit-learn's estimator conventions (``BaseEstimator`` + ``TransformerMixin``): the
constructor only stores its arguments, ``fit`` learns nothing from the data (the model is
already trained; ``fit`` validates the input and records its shape), ``transform`` embeds in
batches under ``torch.no_grad()`` and returns a numpy float32 array, and
``get_params`` / ``set_params`` / ``sklearn.base.clone`` work with the model as a parameter.

Fine-tuning the model inside ``fit`` is deliberately not offered: train it with deepmetric's
losses first, then wrap it. (Why the module is not called ``sklearn.py``: inside the package a
module named ``sklearn`` reads as if it were scikit-learn itself, and a script run from the
package folder would import it instead of scikit-learn.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted
from torch import nn


class EmbeddingTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Embed samples with a trained PyTorch model, as a scikit-learn transformer.

    Args:
        model: the embedding network, ``(batch, *input_shape) -> (batch, embedding_size)``
            (a larger output is flattened). It is run in eval mode (its training flag is
            restored afterwards) and moved to ``device`` in place. ``clone`` deep-copies it, as
            scikit-learn does with every parameter that is not an estimator, so each clone
            (e.g. each cross-validation fold) holds its own copy of the weights.
        batch_size: samples per forward pass.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``torch.device``).
        input_shape: shape of one sample as the model wants it, e.g. ``(1, 8, 8)``; each row of
            a 2-D ``X`` is reshaped to it. ``None``: rows are passed as they are.

    Shapes: ``X``: ``(n_samples, n_features)`` (or ``(n_samples, *sample_shape)``, any number
    of dimensions) -> ``(n_samples, embedding_size)`` float32. Inputs are cast to the dtype of
    the model's parameters.

    Attributes (after ``fit``): ``n_features_in_``, ``embedding_size_``.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.input_shape = input_shape

    def fit(self, X: Any, y: Any = None) -> EmbeddingTransformer:
        """Validate parameters and ``X`` (and check the model accepts it); learns nothing."""
        self._check_params()
        X = self._validated(X, reset=True)
        self.embedding_size_ = self._embed(X[:1]).shape[1]
        return self

    def transform(self, X: Any) -> np.ndarray:
        """Embeddings of ``X``: ``(n_samples, embedding_size)`` float32."""
        check_is_fitted(self, "embedding_size_")
        return self._embed(self._validated(X, reset=False))

    @property
    def _n_features_out(self) -> int:
        """Width of the output, for ``get_feature_names_out`` (``embeddingtransformer0``...)."""
        return self.embedding_size_

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]  # always float32 out
        return tags

    # -- helpers ------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int | np.integer)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {self.device!r} is not a valid torch device") from err
        if self.input_shape is not None and (
            not isinstance(self.input_shape, tuple | list)
            or not all(isinstance(s, int | np.integer) and s > 0 for s in self.input_shape)
        ):
            raise ValueError(
                f"input_shape must be a tuple of positive ints or None, got {self.input_shape!r}"
            )

    def _validated(self, X: Any, reset: bool) -> np.ndarray:
        """``X`` as a finite float array, checked against the shape seen in ``fit``, reshaped
        to ``(n_samples, *input_shape)``."""
        X = check_array(X, dtype=(np.float64, np.float32), allow_nd=True)
        if reset:
            self.n_features_in_ = X.shape[1]
            self._sample_shape = X.shape[1:]
        elif X.shape[1:] != self._sample_shape:
            if X.ndim == 2 and len(self._sample_shape) == 1:  # scikit-learn's wording
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input"
                )
            raise ValueError(
                f"X has samples of shape {X.shape[1:]}, but {type(self).__name__} was fitted "
                f"on samples of shape {self._sample_shape}"
            )
        if self.input_shape is None:
            return X
        if math.prod(X.shape[1:]) != math.prod(self.input_shape):
            raise ValueError(
                f"samples of shape {X.shape[1:]} cannot be reshaped to input_shape "
                f"{tuple(self.input_shape)}"
            )
        return X.reshape(len(X), *self.input_shape)

    def _embed(self, X: np.ndarray) -> np.ndarray:
        """Run the model over ``X`` in batches, without gradients, in eval mode."""
        model = self.model.to(self.device)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        was_training = model.training
        model.eval()
        chunks = []
        try:
            with torch.no_grad():
                for start in range(0, len(X), self.batch_size):
                    rows = X[start : start + self.batch_size]
                    batch = torch.tensor(rows, dtype=dtype, device=self.device)  # a copy
                    chunks.append(self._forward(model, batch))
        finally:
            model.train(was_training)
        return np.concatenate(chunks)

    @staticmethod
    def _forward(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
        try:
            out = model(batch)
        except RuntimeError as err:  # e.g. a shape mismatch inside the model
            raise ValueError(
                f"the model failed on a batch of shape {tuple(batch.shape)}: {err}"
            ) from err
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or len(out) != len(batch):
            raise ValueError("the model must return a tensor with one row per input sample")
        return out.reshape(len(batch), -1).float().cpu().numpy()
