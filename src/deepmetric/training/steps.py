"""Pieces of a training step: mixed precision, frozen BatchNorm, and the gradient cache that
splits a P×K batch into micro-batches without changing its gradient."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import TrainConfig


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of ``config.amp`` on ``device`` (None: full precision).

    ``ValueError`` for ``fp16`` on the CPU (PyTorch's CPU float16 kernels are slow and
    incomplete; use ``bf16``)."""
    amp = config.amp
    if amp == "none":
        return None
    if device.type != "cuda":
        if amp == "fp16":
            raise ValueError("amp: fp16 needs CUDA; on the CPU use amp: bf16 (or none)")
        return torch.bfloat16 if amp == "bf16" else None  # "auto": opt-in on the CPU
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in evaluation mode: it normalises with its
    running statistics and no longer updates them (its affine parameters still train).
    Call it after each ``model.train()``, which switches them back."""
    for layer in module.modules():
        if isinstance(layer, _BatchNorm):
            layer.eval()


RngState = tuple[Tensor, Tensor | None]


def rng_state(device: torch.device) -> RngState:
    """The CPU generator's state and, on CUDA, the device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_gradient_step(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    miner: Callable[..., Any] | None,
    x: Tensor,
    labels: Tensor,
    chunks: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    scale: Callable[[Tensor], Tensor],
) -> Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(model(x), labels, miner(...))``
    computed micro-batch by micro-batch; returns the loss (detached).

    Gao, Zhang, Han & Callan, "Scaling Deep Contrastive Learning Batch Size under Memory
    Limited Setup", 2021 (gradient cache). A metric loss couples every sample of the batch, so
    summing the losses of micro-batches is another loss. Instead:

    1. embed the ``chunks`` micro-batches of ``x`` (``(B, ...)``) without a graph -> ``(B, E)``;
    2. mine and compute the loss on the whole batch's embeddings, and backpropagate it to the
       embeddings (and the loss's own parameters): ``g = dL/d embeddings``, ``(B, E)``;
    3. embed each micro-batch again with a graph and backpropagate its slice of ``g``: by the
       chain rule the parameter gradients sum to those of the whole batch.

    Memory holds one micro-batch's activations and the ``(B, E)`` embeddings. Step 3 must
    compute what step 1 computed: the random state (dropout) is saved before each micro-batch
    in step 1 and restored before it in step 3, and the buffers (BatchNorm's running
    statistics) are restored after step 1 so that they are updated once. BatchNorm in training
    mode normalises each micro-batch with its own statistics, so it is exact only without
    BatchNorm in training mode (``freeze_bn``, or none in the model). With
    ``DistributedDataParallel`` the gradients are averaged once, after the last micro-batch.

    ``scale`` multiplies the loss before its backward (a float16 gradient scaler's), and
    ``autocast`` gives the mixed-precision context of the forward passes.
    """
    device = x.device
    parts = x.tensor_split(chunks)
    buffers = [b.detach().clone() for b in model.buffers()]
    states = []
    with torch.no_grad():
        pieces = []
        for part in parts:
            states.append(rng_state(device))
            with autocast():
                pieces.append(model(part))
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
    embeddings = torch.cat(pieces).detach().requires_grad_(True)
    with autocast():
        indices = miner(embeddings, labels) if miner is not None else None
        loss = loss_fn(embeddings, labels, indices)
    after_loss = rng_state(device)
    scale(loss).backward()
    grad = embeddings.grad
    if grad is None:  # the loss does not depend on the embeddings (no pair was mined)
        return loss.detach()
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel: reduce once
    start = 0
    for i, (part, state) in enumerate(zip(parts, states, strict=True)):
        set_rng_state(state, device)
        last = i == len(parts) - 1
        context = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        with context:
            with autocast():
                out = model(part)
            out.backward(grad[start : start + len(part)].to(out.dtype))
        start += len(part)
    set_rng_state(after_loss, device)
    return loss.detach()
