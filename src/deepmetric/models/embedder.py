"""One call from a run config's ``model:`` section to an :class:`EmbeddingNet`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .backbones import build_backbone
from .nets import EmbeddingNet

#: Trunks whose pretrained weights can be skipped by a ``pretrained=False`` option.
_PRETRAINED_OPTION = ("efficientnet_lite0", "efficientnet-lite0", "hf:", "transformers:")


def build_embedder(
    trunk: str = "small_cnn",
    *,
    weights: str | Path | None = None,
    key_map: dict[str, str] | None = None,
    embedding_size: int = 128,
    hidden: tuple[int, ...] | list[int] = (),
    batch_norm: bool = False,
    normalize: bool = True,
    in_channels: int | None = None,
    **trunk_options: Any,
) -> EmbeddingNet:
    """Trunk by name (:func:`~deepmetric.models.build_backbone`) + embedding head.

    Args:
        trunk, weights, key_map, in_channels, trunk_options: as for ``build_backbone``.
        embedding_size, hidden, batch_norm, normalize: the head, as for
            :class:`~deepmetric.models.EmbeddingNet`.

    Returns:
        an :class:`EmbeddingNet` ``(N, C, H, W) -> (N, embedding_size)`` whose ``input_spec``
        says what to feed it and whose ``describe()`` gives these arguments, JSON-safe, so that
        ``build_embedder(**net.describe())`` (or :func:`embedder_from_config`) rebuilds the
        same architecture. Options must be JSON values (numbers, strings, lists, dicts).
    """
    config: dict[str, Any] = {
        "trunk": trunk,
        "weights": None if weights is None else str(weights),
        "key_map": None if key_map is None else dict(key_map),
        "embedding_size": int(embedding_size),
        "hidden": [int(h) for h in hidden],
        "batch_norm": bool(batch_norm),
        "normalize": bool(normalize),
        "in_channels": in_channels,
        **trunk_options,
    }
    try:
        config = json.loads(json.dumps(config))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"build_embedder arguments must be JSON values to be recorded: {error}"
        ) from error
    backbone = build_backbone(
        trunk, weights=weights, key_map=key_map, in_channels=in_channels, **trunk_options
    )
    net = EmbeddingNet(
        backbone.module,
        backbone.features,
        embedding_size=embedding_size,
        hidden=tuple(hidden),
        batch_norm=batch_norm,
        normalize=normalize,
        input_spec=backbone.input,
    )
    net.build_config = config
    return net


def embedder_from_config(config: dict[str, Any], *, pretrained: bool = False) -> EmbeddingNet:
    """Rebuild the architecture recorded by ``EmbeddingNet.describe()``.

    With ``pretrained=False`` (the default: a run folder's checkpoint supplies the weights
    next) the weights file is not read, and trunks with pretrained weights of their own
    (EfficientNet-Lite0, ``transformers`` folders) start random, which skips loading them.
    A ``transformers`` trunk still needs its folder, for the architecture's ``config.json``.
    """
    kwargs = dict(config)
    if not pretrained:
        kwargs["weights"] = None
        kwargs["key_map"] = None
        trunk = str(kwargs.get("trunk", "small_cnn"))
        if trunk.startswith(_PRETRAINED_OPTION) or (Path(trunk) / "config.json").is_file():
            kwargs["pretrained"] = False
    net = build_embedder(**kwargs)
    net.build_config = json.loads(json.dumps(config))
    return net
