"""Fine-tuning helpers: frozen BatchNorm statistics and trainable switches.

Fine-tuning a pretrained trunk on P×K batches of a few classes, BatchNorm's batch statistics
are those of a handful of classes, not ImageNet's: the DML literature keeps the pretrained
running statistics fixed (e.g. Musgrave et al., "A Metric Learning Reality Check", 2020, which
freezes BatchNorm in its BN-Inception and ResNet-50 trunks).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_FROZEN_AFFINE = "_deepmetric_frozen_affine"


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: run BatchNorm in eval mode (running statistics, no updates)."""
    module.training = False


def freeze_batchnorm(module: nn.Module, *, affine: bool = False) -> int:
    """Freeze the running statistics of every BatchNorm layer in ``module``.

    Each layer is put in eval mode now and kept there: a forward pre-hook sets
    ``training = False`` before every forward, so a later ``model.train()`` (which the trainer
    calls each epoch) does not bring batch statistics back. A hook rather than a replaced
    ``train`` method or class, because a hook survives ``copy.deepcopy``, pickling of the
    module and ``torch.compile``, and leaves ``state_dict`` unchanged. Between ``train()`` and
    the next forward the layer's ``training`` flag reads true; its forwards never are.

    Args:
        module: any module; its BatchNorm layers (1-D, 2-D, 3-D, SyncBatchNorm) are frozen.
        affine: also stop the gradients of the layers' scale and shift (``requires_grad =
            False``, kept so by :func:`set_trainable`).

    Returns:
        the number of BatchNorm layers found (frozen now or already).
    """
    count = 0
    for layer in module.modules():
        if not isinstance(layer, _BatchNorm):
            continue
        count += 1
        layer.eval()
        if _keep_eval not in layer._forward_pre_hooks.values():
            layer.register_forward_pre_hook(_keep_eval)
        if affine:
            setattr(layer, _FROZEN_AFFINE, True)
            for param in layer.parameters(recurse=False):
                param.requires_grad_(False)
    return count


def unfreeze_batchnorm(module: nn.Module) -> int:
    """Undo :func:`freeze_batchnorm`: the layers follow ``train()``/``eval()`` again and their
    scale and shift are trainable. Layers are left in the module's current mode. Returns the
    number of layers unfrozen."""
    count = 0
    for layer in module.modules():
        if not isinstance(layer, _BatchNorm):
            continue
        hooks = [k for k, hook in layer._forward_pre_hooks.items() if hook is _keep_eval]
        for key in hooks:
            del layer._forward_pre_hooks[key]
        if getattr(layer, _FROZEN_AFFINE, False):
            delattr(layer, _FROZEN_AFFINE)
            for param in layer.parameters(recurse=False):
                param.requires_grad_(True)
        layer.training = module.training
        count += bool(hooks)
    return count


def set_trainable(module: nn.Module, flag: bool) -> int:
    """Switch gradients of every parameter of ``module`` on (``flag=True``) or off.

    Freezing a trunk for the first epochs: ``set_trainable(model.trunk, False)``, then
    ``True``. BatchNorm scale and shift frozen by ``freeze_batchnorm(..., affine=True)`` stay
    frozen. Returns the number of parameters switched to ``flag``.
    """
    kept: set[int] = set()
    for layer in module.modules():
        if getattr(layer, _FROZEN_AFFINE, False):
            kept.update(id(p) for p in layer.parameters(recurse=False))
    count = 0
    for param in module.parameters():
        if flag and id(param) in kept:
            continue
        param.requires_grad_(flag)
        count += 1
    return count
