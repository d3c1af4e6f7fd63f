"""BatchNorm over the global batch of a ``torch.distributed`` job, on GPUs and on the CPU.

Under data-parallel training each process holds a share of the batch, and a plain BatchNorm
layer normalises with its share's statistics: the forward pass, and so the loss and gradients,
differ from one process on the whole batch. ``torch.nn.SyncBatchNorm`` computes the statistics
of the global batch, but only on GPUs (it refuses CPU tensors, and DDP refuses it in a CPU
model). :class:`CPUSyncBatchNorm` computes the same thing on the CPU with two differentiable
all-reduces per layer:

    mean = Σ_ranks Σ x / n,    var = Σ_ranks Σ (x - mean)² / n,    y = (x - mean) / √(var + ε)

(``n`` the global number of values per channel; the biased variance normalises, the unbiased one
updates ``running_var``, as in ``torch.nn.BatchNorm``). The all-reduce's backward pass is an
all-reduce of the gradients, so the gradient reaching each rank's input is that of the global
batch. Without a process group, or in evaluation mode, it is a plain BatchNorm.

:func:`convert_sync_batchnorm` swaps every BatchNorm layer of a model for torch's
``SyncBatchNorm`` (CUDA) or :class:`CPUSyncBatchNorm` (CPU), moving the parameters and buffers
over: the state-dict keys do not change and a checkpoint loads into the plain model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """The sum over all processes; its backward pass is the sum of the gradients over all
    processes (each process's result feeds the loss of that process)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def _all_reduce_sum(x: Tensor) -> Tensor:
    """``(C,)`` -> the elementwise sum of every process's ``x``, differentiable."""
    total: Tensor = _AllReduceSum.apply(x)
    return total


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm with the global batch's statistics, for CPU tensors (see the module docstring).

    Shapes: ``(B, C)`` or ``(B, C, *)`` -> the same shape; ``B`` may differ between ranks.
    """

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002 - torch's parameter name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (B, C, ...), got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's parameter name
        """Normalise with the global batch's statistics in training mode under a process group
        of more than one process; otherwise as a plain BatchNorm layer."""
        syncing = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )
        if not syncing:
            return super().forward(input)
        self._check_input_dim(input)
        return self._global_batch_norm(input)

    def _global_batch_norm(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        dims = [0, *range(2, x.ndim)]
        shape = [1, channels] + [1] * (x.ndim - 2)
        # statistics in float64 (exact counts, no cancellation); one all-reduce for the sums
        # and the count, (C + 1,), one for the squared deviations, (C,)
        local_count = torch.tensor([x.numel() // channels], dtype=torch.float64)
        totals = _all_reduce_sum(torch.cat([x.sum(dims, dtype=torch.float64), local_count]))
        count = int(totals[-1].item())
        if count < 2:
            raise ValueError(
                f"BatchNorm needs more than 1 value per channel in training, got {count}"
            )
        mean = totals[:channels] / count
        centred = x - mean.view(shape).to(x.dtype)
        squares = (centred * centred).sum(dims, dtype=torch.float64)
        var = _all_reduce_sum(squares) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape).to(x.dtype)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked.item())
        else:
            factor = self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by one that computes the global batch's
    statistics: ``torch.nn.SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` otherwise, holding
    the same parameters and buffers. In place: ``module`` itself is returned (or its
    replacement, when it is a BatchNorm layer)."""
    if device.type == "cuda":
        converted: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return converted
    if isinstance(module, _BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        replacement = CPUSyncBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        replacement.weight, replacement.bias = module.weight, module.bias
        replacement.running_mean = module.running_mean
        replacement.running_var = module.running_var
        replacement.num_batches_tracked = module.num_batches_tracked
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
