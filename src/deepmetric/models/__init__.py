"""Embedding networks and the trunks they are built on.

* :func:`build_embedder` — the one call from a run config's ``model:`` section (trunk name,
  weights, head) to an :class:`EmbeddingNet` that carries its :class:`InputSpec` and a
  JSON-safe ``describe()``; :func:`embedder_from_config` rebuilds it from that record.
* :func:`build_backbone` — a trunk by name: the built-in ``small_cnn``, ``efficientnet_lite0``
  (ImageNet weights that install offline), ``torchvision:<arch>``, ``timm:<arch>``,
  ``hf:<folder>`` (a ``transformers`` vision model) or ``package.module:callable``; weights only
  from local files, with key-prefix maps for checkpoints saved by other code.
* :class:`EmbeddingNet`, :class:`SmallConvNet`, :class:`SiameseNetwork`,
  :class:`TripletNetwork` — the networks (:mod:`deepmetric.models.nets`).
* :func:`freeze_batchnorm`, :func:`unfreeze_batchnorm`, :func:`set_trainable` — fine-tuning.
"""

from .backbones import Backbone, build_backbone, timm_trunk, torchvision_trunk
from .embedder import build_embedder, embedder_from_config
from .finetune import freeze_batchnorm, set_trainable, unfreeze_batchnorm
from .nets import EmbeddingNet, SiameseNetwork, SmallConvNet, TripletNetwork
from .spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from .weights import apply_key_map, load_weights, read_state_dict

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "EmbeddingNet",
    "InputSpec",
    "SiameseNetwork",
    "SmallConvNet",
    "TripletNetwork",
    "apply_key_map",
    "build_backbone",
    "build_embedder",
    "embedder_from_config",
    "freeze_batchnorm",
    "load_weights",
    "read_state_dict",
    "set_trainable",
    "timm_trunk",
    "torchvision_trunk",
    "unfreeze_batchnorm",
]
