"""Time, memory and agreement of deepmetric's losses against pytorch-metric-learning 2.9.0 (PML).

Every loss class that both libraries export is benchmarked, plus the loss + miner pairs of
:data:`MINER_PAIRS` where both libraries have the loss and the miner. One training step is
timed and measured: the miner (if any), the loss forward and the backward to ``(B, 128)`` float32
embeddings with labels ``0,0,0,0,1,1,1,1,...`` (K samples per class, grouped as a P×K sampler
gives them, which SmoothAPLoss requires).

For each case (loss, B, K):

* **memory**: each library in a fresh process: after the imports, the inputs, the loss and one
  warm-up step, the peak of a second step over what was then in use (peak RSS on CPU, with
  glibc's mmap threshold fixed so freed memory is really given back, see ``MEMORY_ENV``;
  ``max_memory_allocated`` on CUDA). The process may take ``--mem-cap-gb`` more than that and
  ``--timeout`` seconds; a library that exceeds either is recorded as ``failed: out of memory``
  / ``timeout`` and not timed;
* **time**: one more process (keeping freed heap memory, ``TIMING_ENV``, as a training run of
  deepmetric's command line does) runs both libraries on the same inputs, interleaved (ours, PML,
  ours, PML, ...): a warm-up, then ``--repeats`` rounds (fewer from B = 1024 on, and none started
  after ``--time-budget`` seconds), each a sample of one or more steps (at least 50 ms); the
  median milliseconds per step of each library and the ratio PML / ours;
* **agreement**: over the first two calls of that process (the same call history in both, for
  losses with state), the largest absolute and relative difference between the two loss values
  and the largest absolute difference between the embedding gradients.

Losses with learnable weights (proxies, class centres) get ``num_classes = B / K`` and
``embedding_size = 128``; PML's is built after ``torch.manual_seed(0)`` and its ``state_dict`` is
loaded into ours with ``strict=True``, so both start from the same weights.

``--max-batch`` instead runs every deepmetric loss alone at B = 4096 with 4 samples per class
(one process each: a warm-up step, then ``--repeats`` steps, default 3, the first of which is
measured for memory) and reports its median time and peak memory: there is no batch-size cliff.

Run from the repository root::

    python benchmarks/losses.py --quick
    python benchmarks/losses.py --losses ContrastiveLoss,TripletMarginLoss --sizes 1024
    python benchmarks/losses.py                  # the full grid: B = 128..2048, K = 4 and 8
    python benchmarks/losses.py --max-batch
    python benchmarks/losses.py --device cuda --autocast bf16
    python benchmarks/losses.py --sizes 512,1024 --per-class 4 --load 2   # beside another job

``--losses`` takes case names (``TripletMarginLoss+BatchHardMiner``) or loss names; a loss name
selects the loss and its miner pairs. Results go to ``benchmarks/results/losses.json``
(``losses_max_batch.json`` for ``--max-batch``) with a description of the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import pkgutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    MEMORY_ENV,
    TIMING_ENV,
    MemoryProbe,
    cap_memory,
    competing_load,
    describe_failure,
    emit_result,
    fmt,
    format_table,
    machine_info,
    run_worker,
    write_json,
)
from torch import Tensor, nn

SCRIPT = str(Path(__file__).resolve())
RESULTS = Path(__file__).resolve().parent / "results"

SIZES = (128, 512, 1024, 2048)
PER_CLASS = (4, 8)
DIM = 128
SEED = 0
LIBRARIES = ("ours", "pml")
LIBRARY_NAMES = {"ours": "deepmetric", "pml": "PML"}

# Loss + miner pairs benchmarked as one step (miner, then loss on its tuple).
MINER_PAIRS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("TripletMarginLoss", "TripletMarginMiner", {"type_of_triplets": "semihard"}),
    ("TripletMarginLoss", "BatchHardMiner", {}),
    ("MultiSimilarityLoss", "MultiSimilarityMiner", {}),
    ("ContrastiveLoss", "PairMarginMiner", {}),
)

# Losses with a (num_classes, embedding_size) parameter, and the other required arguments.
CLASS_WEIGHT_LOSSES = {
    "ArcFaceLoss",
    "CosFaceLoss",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
}
# Called as loss(embeddings, ref_emb): two views of the same samples, no labels.
TWO_VIEW_LOSSES = {"SelfSupervisedLoss", "VICRegLoss"}
# Called as loss(embeddings): no labels.
UNLABELLED_LOSSES = {"ManifoldLoss"}
# Exported by PML's losses module but not losses themselves.
NOT_LOSSES = {"BaseMetricLossFunction", "BaseLossWrapper", "GenericPairLoss"}

# Loss values further apart than this (relative) are flagged in the status column.
FLAG_RTOL = 1e-4
# Memory ratios count a peak below this many MiB as this many: smaller RSS figures are noise.
MEMORY_FLOOR_MB = 1.0
# A timed sample repeats a short step until it lasts at least this long.
MIN_SAMPLE_S = 0.05
# Each library steps this long before it is timed (after its two traced calls).
WARMUP_S = 0.5


@dataclass
class Case:
    """One benchmarked step: a loss, optionally fed by a miner."""

    loss: str
    miner: str | None = None
    miner_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.miner is None:
            return self.loss
        options = ",".join(str(value) for value in self.miner_kwargs.values())
        return f"{self.loss}+{self.miner}" + (f"({options})" if options else "")


# -- finding the classes of each library -----------------------------------------------------------


def _public_modules(package: Any) -> Iterator[Any]:
    """The importable public submodules of a package (one being written may fail to import)."""
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        try:
            yield importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception as exc:  # a broken submodule must not stop the benchmark
            print(f"note: cannot import {package.__name__}.{info.name}: {exc}", file=sys.stderr)


@functools.cache
def loss_classes(library: str) -> dict[str, type[nn.Module]]:
    """Name -> class of every loss a library offers.

    Ours: the names in ``deepmetric.losses.__all__``, then any class defined in a public
    submodule of ``deepmetric.losses`` (losses not exported yet).
    """
    if library == "pml":
        from pytorch_metric_learning import losses as pml_losses

        return {
            name: obj
            for name, obj in vars(pml_losses).items()
            if isinstance(obj, type) and issubclass(obj, nn.Module) and name not in NOT_LOSSES
        }
    import deepmetric.losses as our_losses

    found = {
        name: getattr(our_losses, name)
        for name in getattr(our_losses, "__all__", ())
        if hasattr(our_losses, name)
    }
    for module in _public_modules(our_losses):
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, nn.Module)
                and obj.__module__.startswith("deepmetric.")
            ):
                found.setdefault(name, obj)
    return found


@functools.cache
def miner_classes(library: str) -> dict[str, type[nn.Module]]:
    """Name -> class of every miner a library offers (none if ``deepmetric.miners`` is missing)."""
    try:
        module = importlib.import_module(
            "pytorch_metric_learning.miners" if library == "pml" else "deepmetric.miners"
        )
    except Exception:  # not written yet, or broken: benchmark no miner pair
        return {}
    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, nn.Module)
    }


def discover_cases(selected: list[str] | None) -> list[Case]:
    """Every loss both libraries have, then every miner pair both have; filtered by name."""
    ours, theirs = loss_classes("ours"), loss_classes("pml")
    our_miners, their_miners = miner_classes("ours"), miner_classes("pml")
    cases = [Case(name) for name in sorted(set(ours) & set(theirs))]
    cases += [
        Case(loss, miner, kwargs)
        for loss, miner, kwargs in MINER_PAIRS
        if loss in ours and loss in theirs and miner in our_miners and miner in their_miners
    ]
    if selected is None:
        return cases
    unknown = [name for name in selected if not any(name in (c.name, c.loss) for c in cases)]
    if unknown:
        print(
            f"note: not in both libraries (or unknown): {', '.join(unknown)}; "
            f"available: {', '.join(c.name for c in cases)}",
            file=sys.stderr,
        )
    return [case for case in cases if case.name in selected or case.loss in selected]


# -- building one library's step (inside a worker) -------------------------------------------------

Step = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class Runner:
    """One library's training step: ``step(embeddings, labels, ref_emb) -> scalar loss``, and
    the modules whose parameter gradients are cleared between steps."""

    step: Step
    modules: list[nn.Module]


def new_loss(library: str, name: str, n_classes: int, dim: int) -> nn.Module:
    """A library's loss ``name`` with its defaults, given the arguments it cannot do without."""
    cls = loss_classes(library)[name]
    kwargs: dict[str, Any] = {}
    if name in CLASS_WEIGHT_LOSSES:
        kwargs = {"num_classes": n_classes, "embedding_size": dim}
    elif name == "P2SGradLoss":
        kwargs = {"descriptors_dim": dim, "num_classes": n_classes}
    elif name == "RankedListLoss":  # the paper's margin; a temperature PML does not warn about
        kwargs = {"margin": 0.4, "Tn": 1.0}
    elif name == "ManifoldLoss":
        kwargs = {"l": dim}
    elif name == "CrossBatchMemory":
        kwargs = {
            "loss": new_loss(library, "ContrastiveLoss", n_classes, dim),
            "embedding_size": dim,
        }
    elif name == "SelfSupervisedLoss":
        kwargs = {"loss": new_loss(library, "ContrastiveLoss", n_classes, dim)}
    elif name == "MultipleLosses":
        kwargs = {
            "losses": [
                new_loss(library, "ContrastiveLoss", n_classes, dim),
                new_loss(library, "TripletMarginLoss", n_classes, dim),
            ]
        }
    return cls(**kwargs)


def make_step(case: Case, loss_fn: nn.Module, miner: nn.Module | None) -> Step:
    def step(embeddings: Tensor, labels: Tensor, ref_emb: Tensor) -> Tensor:
        if case.loss in TWO_VIEW_LOSSES:
            return loss_fn(embeddings, ref_emb)
        if case.loss in UNLABELLED_LOSSES:
            return loss_fn(embeddings)
        indices_tuple = None if miner is None else miner(embeddings, labels)
        return loss_fn(embeddings, labels, indices_tuple)

    return step


def build_runners(
    case: Case, libraries: list[str], n_classes: int, dim: int, device: torch.device
) -> tuple[dict[str, Runner], dict[str, str], list[str]]:
    """The runners of ``libraries`` for ``case``: ``(runners, failures, notes)``.

    PML's loss is always built, first, after ``torch.manual_seed(SEED)``: when ours is wanted,
    PML's ``state_dict`` is loaded into it (``strict=True``; a mismatch is noted and ours keeps
    its own initial weights), so both start from the same proxies or class weights.
    """
    losses: dict[str, nn.Module] = {}
    runners: dict[str, Runner] = {}
    failures: dict[str, str] = {}
    notes: list[str] = []
    for library in ("pml", "ours") if "ours" in libraries else ("pml",):
        try:
            torch.manual_seed(SEED)
            loss_fn = new_loss(library, case.loss, n_classes, dim).to(device)
            miner = None
            if case.miner is not None:
                miner = miner_classes(library)[case.miner](**case.miner_kwargs).to(device)
        except Exception as exc:  # recorded as this library's status
            failures[library] = describe_failure(exc)
            continue
        losses[library] = loss_fn
        runners[library] = Runner(make_step(case, loss_fn, miner), [loss_fn])
    if "ours" in losses and "pml" in losses:
        reference = losses["pml"].state_dict()
        if reference or losses["ours"].state_dict():
            try:
                losses["ours"].load_state_dict(reference, strict=True)
            except Exception as exc:  # ours then keeps its own initial weights
                message = " ".join(line.strip() for line in str(exc).splitlines())
                notes.append(f"state_dict not loaded (strict=True): {message[:200]}")
    wanted = set(libraries)
    return (
        {library: runner for library, runner in runners.items() if library in wanted},
        {library: failure for library, failure in failures.items() if library in wanted},
        notes,
    )


# -- one step, timed (inside a worker) -------------------------------------------------------------


def autocast_context(device: torch.device, mode: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for ``--autocast fp16|bf16`` (the forward only), else nothing."""
    if mode == "none":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Inputs:
    """The leaves one library's steps read and write gradients to."""

    embeddings: Tensor  # (B, D), requires grad
    labels: Tensor  # (B,)
    ref_emb: Tensor  # (B, D), requires grad; the second view for the two-view losses


def make_inputs(batch_size: int, per_class: int, dim: int, device: torch.device) -> Inputs:
    generator = torch.Generator().manual_seed(SEED)
    embeddings = torch.randn(batch_size, dim, generator=generator)
    ref_emb = embeddings + 0.1 * torch.randn(batch_size, dim, generator=generator)
    labels = torch.arange(batch_size // per_class).repeat_interleave(per_class)
    return Inputs(
        embeddings.to(device).requires_grad_(True),
        labels.to(device),
        ref_emb.to(device).requires_grad_(True),
    )


def clone_inputs(inputs: Inputs) -> Inputs:
    """Separate leaves with the same values, so two libraries' gradients do not mix."""
    return Inputs(
        inputs.embeddings.detach().clone().requires_grad_(True),
        inputs.labels.clone(),
        inputs.ref_emb.detach().clone().requires_grad_(True),
    )


def run_step(
    runner: Runner, inputs: Inputs, device: torch.device, autocast: str
) -> tuple[float, Tensor, float]:
    """One step from cleared gradients: ``(loss value, embedding gradient, seconds)``.

    The RNG is reseeded first, for the losses that draw random numbers (ManifoldLoss).
    """
    inputs.embeddings.grad = None
    inputs.ref_emb.grad = None
    for module in runner.modules:
        module.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    synchronize(device)
    start = time.perf_counter()
    with autocast_context(device, autocast):
        loss = runner.step(inputs.embeddings, inputs.labels, inputs.ref_emb)
    if loss.requires_grad:
        loss.backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    grad = inputs.embeddings.grad
    if grad is None:
        grad = torch.zeros_like(inputs.embeddings)
    return float(loss.detach().float()), grad, seconds


# -- the three kinds of worker ---------------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement described by ``spec`` (see :func:`worker_spec`) and return its result."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if device.type == "cuda" and device.index is None:  # the CUDA memory calls want an index
        device = torch.device("cuda", torch.cuda.current_device())
    case = Case(spec["loss"], spec["miner"], spec["miner_kwargs"])
    batch_size, per_class = spec["batch_size"], spec["per_class"]
    inputs = make_inputs(batch_size, per_class, DIM, device)
    runners, failures, notes = build_runners(
        case, spec["libraries"], batch_size // per_class, DIM, device
    )
    # Touch the allocator and start the thread pools before the cap and the baseline.
    (torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)).sum().item()
    cap = cap_memory(int(spec["mem_cap_gb"] * 2**30), device)
    result: dict[str, Any] = {"notes": notes, "cap": cap, "libraries": {}}
    for library, status in failures.items():
        result["libraries"][library] = {"status": status}
    if spec["task"] == "time":
        timed, trace = time_libraries(runners, inputs, device, spec)
        result["libraries"].update(timed)
        result.update(compare(trace))
        return result
    for library, runner in runners.items():  # one library: "memory" and "max_batch" tasks
        result["libraries"][library] = measure_memory(runner, inputs, device, spec)
    return result


def measure_memory(
    runner: Runner, inputs: Inputs, device: torch.device, spec: dict[str, Any]
) -> dict[str, Any]:
    """Peak memory of one step, after a warm-up step (which does the one-off work of a first
    call: lazy imports, kernel selection, the autograd engine's start). With ``max_batch``, also
    the median time of ``repeats`` more steps."""
    probe = MemoryProbe(device)
    try:
        run_step(runner, inputs, device, spec["autocast"])
        probe.start()
        value, grad, seconds = run_step(runner, inputs, device, spec["autocast"])
        measured: dict[str, Any] = {
            "status": "ok",
            "peak_mb": probe.peak_mb(),
            "loss": value,
            "finite": math.isfinite(value) and bool(torch.isfinite(grad).all()),
        }
        if spec["task"] == "max_batch":
            times = [seconds] + [
                run_step(runner, inputs, device, spec["autocast"])[2]
                for _ in range(spec["repeats"] - 1)
            ]
            measured["times_ms"] = [1000 * t for t in times]
            measured["median_ms"] = statistics.median(measured["times_ms"])
    except Exception as exc:  # recorded as this library's status
        return {"status": describe_failure(exc)}
    return measured


Trace = list[dict[str, tuple[float, Tensor]]]  # per call: library -> (loss value, gradient)


def time_libraries(
    runners: dict[str, Runner], inputs: Inputs, device: torch.device, spec: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], Trace]:
    """Time the libraries on the same inputs, interleaved; trace their first two calls.

    Warm-up: each library is called twice, and its loss values and gradients are kept for
    :func:`compare` (the first two calls, so that a loss with state, such as CrossBatchMemory's
    queue, has had the same history in both libraries); then it keeps stepping for
    ``WARMUP_S`` (a library's first steps can be several times slower than its steady state,
    while the allocator settles: PML's ContrastiveLoss at B=512 took 16, 10, 6, 4.1 and 3.9 ms
    in its first five timed rounds). The last warm-up step's duration sets how many steps one
    timed sample takes (enough for ``MIN_SAMPLE_S``, so millisecond steps are not lost in timer
    and scheduler noise). Then up to ``repeats`` rounds of one sample per
    library, in turn; no round starts after ``time_budget_s``, but at least one runs. Returns
    each library's milliseconds per step (one figure per round, their median and minimum) and
    the trace.
    """
    autocast = spec["autocast"]
    leaves = {library: clone_inputs(inputs) for library in runners}
    failed: dict[str, str] = {}
    trace: Trace = [{}, {}]
    steps_per_sample: dict[str, int] = {}
    for library, runner in runners.items():
        try:
            for call in trace:
                value, grad, seconds = run_step(runner, leaves[library], device, autocast)
                call[library] = (value, grad.detach().clone())
            warm_until = time.perf_counter() + WARMUP_S
            while time.perf_counter() < warm_until:
                seconds = run_step(runner, leaves[library], device, autocast)[2]
        except Exception as exc:  # recorded as this library's status
            failed[library] = describe_failure(exc)
            continue
        steps_per_sample[library] = max(1, math.ceil(MIN_SAMPLE_S / max(seconds, 1e-9)))

    times: dict[str, list[float]] = {library: [] for library in runners}
    start = time.perf_counter()
    for round_index in range(spec["repeats"]):
        if round_index > 0 and time.perf_counter() - start > spec["time_budget_s"]:
            break
        for library, runner in runners.items():
            if library in failed:
                continue
            steps = steps_per_sample[library]
            try:
                seconds = sum(
                    run_step(runner, leaves[library], device, autocast)[2] for _ in range(steps)
                )
            except Exception as exc:  # recorded as this library's status
                failed[library] = describe_failure(exc)
                continue
            times[library].append(1000 * seconds / steps)

    timed: dict[str, dict[str, Any]] = {}
    for library in runners:
        if library in failed:
            timed[library] = {"status": failed[library]}
        else:
            ms = times[library]
            timed[library] = {
                "status": "ok",
                "times_ms": ms,
                "median_ms": statistics.median(ms),
                "min_ms": min(ms),
                "steps_per_sample": steps_per_sample[library],
            }
    return timed, trace


def compare(trace: Trace) -> dict[str, Any]:
    """Largest differences between the libraries' loss values and gradients over the calls in
    which both ran."""
    pairs = [call for call in trace if set(call) >= {"ours", "pml"}]
    if not pairs:
        return {}
    abs_loss = max(abs(r["ours"][0] - r["pml"][0]) for r in pairs)
    rel_loss = max(abs(r["ours"][0] - r["pml"][0]) / max(abs(r["pml"][0]), 1e-12) for r in pairs)
    abs_grad = max(float((r["ours"][1] - r["pml"][1]).abs().max()) for r in pairs)
    return {
        "loss_ours": pairs[0]["ours"][0],
        "loss_pml": pairs[0]["pml"][0],
        "max_abs_loss_diff": abs_loss,
        "max_rel_loss_diff": rel_loss,
        "max_abs_grad_diff": abs_grad,
        "max_abs_grad": float(pairs[0]["pml"][1].abs().max()),
    }


# -- the driver ------------------------------------------------------------------------------------


def repeats_for(batch_size: int, repeats: int) -> int:
    """Fewer timed rounds for the big batches: all of them up to B = 512, then proportionally
    fewer, but at least 2."""
    return repeats if batch_size <= 512 else max(2, repeats * 512 // batch_size)


def worker_spec(
    args: argparse.Namespace, case: Case, task: str, libraries: list[str], b: int, k: int
) -> dict[str, Any]:
    return {
        "task": task,
        "loss": case.loss,
        "miner": case.miner,
        "miner_kwargs": case.miner_kwargs,
        "libraries": libraries,
        "batch_size": b,
        "per_class": k,
        "repeats": args.repeats if task == "max_batch" else repeats_for(b, args.repeats),
        "time_budget_s": args.time_budget,
        "threads": args.threads,
        "device": args.device,
        "autocast": args.autocast,
        "mem_cap_gb": args.mem_cap_gb,
    }


def run_case(args: argparse.Namespace, case: Case, b: int, k: int) -> dict[str, Any]:
    """Memory of each library (one process each), then both timed together (one process)."""
    row: dict[str, Any] = {"case": case.name, "batch_size": b, "per_class": k, "notes": []}
    libraries: dict[str, dict[str, Any]] = {}
    for library in LIBRARIES:
        spec = worker_spec(args, case, "memory", [library], b, k)
        result = run_worker(SCRIPT, spec, args.timeout, args.threads, MEMORY_ENV)
        row["notes"] += result.get("notes", [])
        measured = result.get("libraries", {}).get(library, {"status": result.get("status")})
        libraries[library] = {"status": measured["status"], "peak_mb": measured.get("peak_mb")}
        if measured.get("finite") is False:
            row["notes"].append(f"{LIBRARY_NAMES[library]}: non-finite loss or gradient")
    to_time = [lib for lib in LIBRARIES if libraries[lib]["status"] == "ok"]
    if to_time:
        # Other processes on the machine skew the times: keep the load next to them.
        row["load_average_1min"] = os.getloadavg()[0]
        spec = worker_spec(args, case, "time", to_time, b, k)
        result = run_worker(SCRIPT, spec, args.timeout, args.threads, TIMING_ENV)
        timed = result.get("libraries", {})
        for library in to_time:
            outcome = timed.get(library, {"status": result.get("status", "failed: no result")})
            libraries[library]["status"] = outcome["status"]
            for key in ("median_ms", "min_ms", "times_ms", "steps_per_sample"):
                libraries[library][key] = outcome.get(key)
        row.update({key: value for key, value in result.items() if key.startswith(("loss", "max"))})
    row["notes"] = sorted(set(row["notes"]))
    row["ours"], row["pml"] = libraries["ours"], libraries["pml"]
    ours, pml = libraries["ours"], libraries["pml"]
    if ours.get("median_ms") and pml.get("median_ms"):
        row["speedup"] = pml["median_ms"] / ours["median_ms"]
    if ours.get("peak_mb") is not None and pml.get("peak_mb") is not None:
        row["memory_ratio"] = max(pml["peak_mb"], MEMORY_FLOOR_MB) / max(
            ours["peak_mb"], MEMORY_FLOOR_MB
        )
    row["status"] = summarise(row)
    return row


def summarise(row: dict[str, Any]) -> str:
    problems = [
        f"{LIBRARY_NAMES[library]} {row[library]['status']}"
        for library in LIBRARIES
        if row[library]["status"] != "ok"
    ]
    if row.get("max_rel_loss_diff", 0.0) > FLAG_RTOL:
        problems.append("loss differs")
    problems += row["notes"]
    return "; ".join(problems) or "ok"


def shorten(status: str, width: int = 80) -> str:
    """A status cut to ``width`` characters for the table (the JSON keeps it whole)."""
    return status if len(status) <= width else status[: width - 1] + "…"


def table_row(row: dict[str, Any]) -> list[str]:
    ours, pml = row["ours"], row["pml"]
    return [
        row["case"],
        str(row["batch_size"]),
        str(row["per_class"]),
        fmt(ours.get("median_ms"), ".1f"),
        fmt(pml.get("median_ms"), ".1f"),
        fmt(row.get("speedup"), ".2f") + ("x" if "speedup" in row else ""),
        fmt(ours.get("peak_mb"), ".1f"),
        fmt(pml.get("peak_mb"), ".1f"),
        fmt(row.get("memory_ratio"), ".1f") + ("x" if "memory_ratio" in row else ""),
        fmt(row.get("max_rel_loss_diff"), ".1e"),
        fmt(row.get("max_abs_grad_diff"), ".1e"),
        shorten(row["status"]),
    ]


COMPARE_HEADERS = (
    "case",
    "B",
    "K",
    "ours ms",
    "PML ms",
    "speed-up",
    "ours MB",
    "PML MB",
    "mem ratio",
    "|Δloss| rel",
    "|Δgrad|",
    "status",
)


def compare_mode(args: argparse.Namespace, cases: list[Case]) -> dict[str, Any]:
    rows = []
    total = len(cases) * len(args.sizes) * len(args.per_class)
    for case in cases:
        for b in args.sizes:
            for k in args.per_class:
                row = run_case(args, case, b, k)
                rows.append(row)
                print(f"[{len(rows)}/{total}] {case.name} B={b} K={k}: {row['status']}", flush=True)
    print()
    print(format_table(COMPARE_HEADERS, [table_row(row) for row in rows], left=(0, -1)))
    return {"results": rows}


MAX_BATCH_HEADERS = ("case", "B", "K", "ours ms", "ours MB", "status")


def max_batch_mode(args: argparse.Namespace, cases: list[Case]) -> dict[str, Any]:
    rows = []
    for case in cases:
        for b in args.sizes:
            for k in args.per_class:
                spec = worker_spec(args, case, "max_batch", ["ours"], b, k)
                result = run_worker(SCRIPT, spec, args.timeout, args.threads, MEMORY_ENV)
                ours = result.get("libraries", {}).get("ours", {"status": result.get("status")})
                row = {"case": case.name, "batch_size": b, "per_class": k, "ours": ours}
                row["notes"] = result.get("notes", [])
                rows.append(row)
                print(f"{case.name} B={b} K={k}: {ours['status']}", flush=True)
    table = [
        [
            row["case"],
            str(row["batch_size"]),
            str(row["per_class"]),
            fmt(row["ours"].get("median_ms"), ".1f"),
            fmt(row["ours"].get("peak_mb"), ".1f"),
            shorten(row["ours"]["status"]),
        ]
        for row in rows
    ]
    print()
    print(format_table(MAX_BATCH_HEADERS, table, left=(0, -1)))
    return {"results": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def int_list(text: str) -> list[int]:
        return [int(item) for item in text.split(",") if item]

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="B=512, K=4 only, 3 repeats")
    parser.add_argument(
        "--max-batch",
        action="store_true",
        help="each deepmetric loss alone at B=4096, K=4: time and peak memory",
    )
    parser.add_argument("--sizes", type=int_list, help="batch sizes, e.g. 128,512")
    parser.add_argument("--per-class", type=int_list, help="samples per class, e.g. 4,8")
    parser.add_argument("--losses", help="comma-separated case or loss names (default: all)")
    parser.add_argument("--repeats", type=int, help="timed rounds per library (default 5)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=120.0,
        help="seconds of timing per case before stopping",
    )
    parser.add_argument("--mem-cap-gb", type=float, default=16.0, help="memory cap per process")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per process")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--autocast", choices=("none", "fp16", "bf16"), default="none")
    parser.add_argument(
        "--load",
        type=int,
        default=None,
        metavar="THREADS",
        help="run a competing process of matrix products on THREADS threads throughout",
    )
    parser.add_argument("--out", help="JSON output path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.max_batch:
        args.sizes = args.sizes or [4096]
        args.per_class = args.per_class or [4]
        args.repeats = args.repeats or 3
        args.out = args.out or str(RESULTS / "losses_max_batch.json")
    elif args.quick:
        args.sizes = args.sizes or [512]
        args.per_class = args.per_class or [4]
        args.repeats = args.repeats or 3
    args.sizes = args.sizes or list(SIZES)
    args.per_class = args.per_class or list(PER_CLASS)
    args.repeats = args.repeats or 5
    args.out = args.out or str(RESULTS / "losses.json")
    for b in args.sizes:
        for k in args.per_class:
            if k < 2:
                parser.error(f"{k} samples per class: a class needs at least 2 for a positive pair")
            if b % k:
                parser.error(f"batch size {b} is not a multiple of {k} samples per class")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        emit_result(worker(json.loads(args.worker)))
        return
    selected = [name for name in args.losses.split(",") if name] if args.losses else None
    cases = discover_cases(selected)
    if not cases:
        sys.exit("no case to run")
    run = max_batch_mode if args.max_batch else compare_mode
    payload = {
        "machine": machine_info(args.threads, args.device),
        "settings": {
            key: getattr(args, key)
            for key in ("sizes", "per_class", "repeats", "time_budget", "mem_cap_gb", "timeout")
        }
        | {"autocast": args.autocast, "dim": DIM, "seed": SEED, "mode": run.__name__}
        | {"competing_load_threads": args.load},
        "cases": [asdict(case) | {"name": case.name} for case in cases],
    }
    with competing_load(args.load):
        payload |= run(args, cases)
    write_json(args.out, payload)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
