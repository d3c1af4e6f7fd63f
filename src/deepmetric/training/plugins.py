"""Step plug-ins: a method that changes what a training step computes (its losses, its own
trainable parts) without branches in the :class:`~deepmetric.training.Trainer`.

The trainer's own step is ``loss(model(x), labels, miner(...))``. A plug-in replaces it by
:meth:`StepPlugin.losses`, and brings the rest of what it needs through the same interface: its
modules (moved to the device, switched to training mode, checkpointed), its optimizer groups,
and per-step values averaged into the epoch record. :class:`HDMLStep` is the plug-in of
HDML (Zheng et al., CVPR 2019).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ..hdml import HDML


@dataclass
class StepLosses:
    """What a plug-in's step computed on a batch.

    Attributes:
        loss: the scalar to backpropagate (its gradients train every part).
        reported: the batch's ``train_loss`` (a detached scalar).
        logged: more per-step values, averaged over the epoch into its record.
    """

    loss: Tensor
    reported: Tensor
    logged: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class StepPlugin(Protocol):
    """The interface of a step plug-in (see the module docstring).

    Attributes:
        name: the checkpoint key of :attr:`module`'s state (also in error messages).
        module: the plug-in's own trainable modules and buffers.
    """

    name: str
    module: nn.Module

    def losses(
        self, model: nn.Module, x: Tensor, labels: Tensor, miner: Callable[..., Any] | None
    ) -> StepLosses:
        """The step's losses on a batch ``x`` ``(B, ...)`` with ``labels`` ``(B,)``."""
        ...

    def loss_modules(self) -> list[nn.Module]:
        """Modules whose parameters train with the loss's (``loss_lr``)."""
        ...

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups of :attr:`module`'s parameters (each with a ``name``)."""
        ...


class HDMLStep:
    """HDML as a step plug-in: ``features = model.features(x)``, ``embeddings =
    model.embed_features(features)``, the miner on the embeddings, and
    :meth:`HDML.step_losses`; one backward of the three losses trains the model and the loss
    (``J_metric``), HDML's generator (``J_gen``) and its classifier (cross-entropy), each in its
    own optimizer group at :meth:`HDML.parameter_groups`' rates. The reported loss is ``J_m``,
    the metric loss on the real batch (comparable with a run without HDML).

    ``ValueError`` unless the model has ``features`` and ``embed_features`` (as
    :class:`~deepmetric.models.EmbeddingNet`) and ``hdml`` was built on ``loss``.
    """

    name = "hdml"

    def __init__(self, hdml: HDML, model: nn.Module, loss: nn.Module) -> None:
        if not isinstance(hdml, HDML):
            raise ValueError(f"hdml must be a deepmetric.hdml.HDML, got {type(hdml).__name__}")
        features = getattr(model, "features", None)
        embed_features = getattr(model, "embed_features", None)
        if not callable(features) or not callable(embed_features):
            raise ValueError(
                "HDML needs a model with features(x) -> trunk features and embed_features(f) -> "
                f"embeddings (like deepmetric.models.EmbeddingNet); {type(model).__name__} has not"
            )
        if hdml.metric_loss is not loss:
            raise ValueError("hdml.metric_loss must be the trainer's loss (build HDML on the loss)")
        self.hdml = hdml
        self.module: nn.Module = hdml

    def losses(
        self, model: nn.Module, x: Tensor, labels: Tensor, miner: Callable[..., Any] | None
    ) -> StepLosses:
        features = model.features(x)  # type: ignore[operator]
        embeddings = model.embed_features(features)  # type: ignore[operator]
        indices = miner(embeddings, labels) if miner is not None else None
        parts = self.hdml.step_losses(features, embeddings, labels, indices)
        logged = {
            "hdml_metric_loss": float(parts.metric_loss.detach()),
            "hdml_synthetic_loss": float(parts.j_syn),
            "hdml_generator_loss": float(parts.generator_loss.detach()),
            "hdml_classifier_loss": float(parts.classifier_loss.detach()),
            "hdml_synthetic_weight": float(parts.synthetic_weight),
        }
        # the gradients of the three parts do not cross: one backward of their sum
        return StepLosses(parts.total(), parts.j_m.detach(), logged)

    def loss_modules(self) -> list[nn.Module]:
        return [self.hdml.synthetic_loss]  # usually the trainer's loss itself

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        # HDML's groups: [metric (the model and the loss: the trainer's own), generator, classifier]
        groups = self.hdml.parameter_groups(model, metric_lr=lr)
        return [{**g, "weight_decay": 0.0} for g in groups[1:]]
