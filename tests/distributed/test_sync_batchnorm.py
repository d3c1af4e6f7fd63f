"""BatchNorm over the global batch on the CPU (:mod:`deepmetric.distributed.sync_batchnorm`) with
real processes: equal to one BatchNorm layer on the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepmetric.distributed.launch import start_processes
from deepmetric.distributed.sync_batchnorm import CPUSyncBatchNorm, convert_sync_batchnorm
from tests.distributed.process_cases import WORLD

BN_SHARDS = [5, 9]  # rows of the global batch on ranks 0 and 1


def _batchnorm_case() -> tuple[list[nn.Module], list[Tensor], list[Tensor]]:
    """Two BatchNorm layers with non-trivial affine parameters (BatchNorm2d with momentum 0.1,
    BatchNorm1d with a cumulative average), their global batches and loss weights."""
    g = torch.Generator().manual_seed(7)
    layers: list[nn.Module] = [nn.BatchNorm2d(3), nn.BatchNorm1d(4, momentum=None)]
    inputs = [torch.randn(14, 3, 4, 4, generator=g), torch.randn(14, 4, generator=g) * 3 + 1]
    for layer in layers:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=g)
            layer.bias.uniform_(-1, 1, generator=g)
    layers = [layer.double() for layer in layers]
    inputs = [x.double() for x in inputs]
    weights = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in inputs]
    return layers, inputs, weights


def _batchnorm_step(layer: nn.Module, x: Tensor, w: Tensor) -> dict[str, Tensor]:
    """Two training steps' forward and the second one's backward of ``sum(w * layer(x))``."""
    layer(x * 0.5)  # a first batch: the running statistics are averages of two
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * w).sum().backward()
    assert x.grad is not None
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        **{f"grad {name}": p.grad for name, p in layer.named_parameters() if p.grad is not None},
        **{name: b.clone() for name, b in layer.named_buffers()},
    }


def _batchnorm_on_rank(root: str) -> None:
    rank = dist.get_rank()
    start, size = sum(BN_SHARDS[:rank]), BN_SHARDS[rank]
    results = []
    for layer, x, w in zip(*_batchnorm_case(), strict=True):
        synced = convert_sync_batchnorm(layer, torch.device("cpu"))
        assert isinstance(synced, CPUSyncBatchNorm)
        results.append(_batchnorm_step(synced, x[start : start + size], w[start : start + size]))
    torch.save(results, Path(root) / f"bn{rank}.pt")


def test_batchnorm_over_the_global_batch_on_the_cpu(tmp_path: Path) -> None:
    start_processes(WORLD, _batchnorm_on_rank, (str(tmp_path),), device="cpu", timeout_s=60)
    ranks = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in range(WORLD)]
    layers, inputs, weights = _batchnorm_case()
    for i, (layer, x, w) in enumerate(zip(layers, inputs, weights, strict=True)):
        ref = _batchnorm_step(layer, x, w)  # torch's BatchNorm on the whole batch
        ours = [rank[i] for rank in ranks]
        assert ours[0].keys() == ref.keys()
        for key in ("out", "x_grad"):  # each rank holds its rows
            torch.testing.assert_close(torch.cat([o[key] for o in ours]), ref[key], msg=key)
        for key in ("grad weight", "grad bias"):  # the global gradient: the ranks' sum
            torch.testing.assert_close(sum(o[key] for o in ours), ref[key], msg=key)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            for o in ours:
                torch.testing.assert_close(o[key], ref[key], msg=key)
