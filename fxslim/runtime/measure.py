"""Measuring modules on the CPU: parameters, MACs (torch.utils.flop_counter), latency."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxslim._args import check_module, positive_int
from fxslim._inputs import as_inputs
from fxslim.errors import ArgumentError

__all__ = [
    "FlopCounter",
    "count_macs",
    "count_params",
    "cpu_info",
    "measure_latency",
    "onnx_latency",
    "peak_memory_bytes",
    "throughput",
]




class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every count goes to "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class FlopCounter(FlopCounterMode):
    """torch's FlopCounterMode with totals only (``get_flop_counts()["Global"]``).

    Its per-module breakdown hooks autograd on every module input that requires grad,
    and fails with a raw error on a view of a parameter made without grad tracking
    (timm's CaiT passes ``cls_token.expand(...)`` into its class-attention blocks), under
    ``no_grad`` and ``inference_mode`` alike. fxslim reads only the totals.
    """

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _GlobalOnly()


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and instruction-set flags (no flags where /proc/cpuinfo is absent):
    what decides int8 speed (VNNI) and bf16 speed on the CPU."""
    name, flags = platform.processor() or platform.machine() or "unknown CPU", []
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return name, flags
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), name)
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return name, flags


def count_params(model: nn.Module) -> int:
    """Number of parameter elements."""
    check_module("model", model)
    return sum(p.numel() for p in model.parameters())


class no_mha_fastpath:
    """nn.MultiheadAttention's fused inference kernel has no FLOP formula: count the
    unfused path, whose arithmetic is the same."""

    def __enter__(self) -> None:
        self.old = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)

    def __exit__(self, *exc: object) -> None:
        torch.backends.mha.set_fastpath_enabled(self.old)


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass, from torch.utils.flop_counter (FLOPs / 2)."""
    check_module("model", model)
    with FlopCounter() as counter, torch.inference_mode(), no_mha_fastpath():
        as_inputs(example_inputs).call(model)
    return counter.get_total_flops() // 2


def measure_latency(
    fn: Callable[[], Any] | nn.Module,
    example_inputs: Any = None,
    *,
    warmup: int = 5,
    runs: int = 30,
    threads: int | None = None,
) -> dict[str, float]:
    """Median and p90 latency in milliseconds of a module forward or a zero-arg callable.

    Args:
        fn: an nn.Module (called on `example_inputs` under inference_mode) or a callable.
        warmup: untimed runs first.
        runs: timed runs.
        threads: torch intra-op threads during the measurement (restored afterwards).
    """
    if not (isinstance(fn, nn.Module) or callable(fn)):
        raise ArgumentError(f"fn must be an nn.Module or a zero-argument callable, got {type(fn).__name__}")
    positive_int("runs", runs)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ArgumentError(f"warmup must be an int >= 0, got {warmup!r}")
    if threads is not None:
        positive_int("threads", threads)
    if isinstance(fn, nn.Module):
        module, xs = fn.eval(), as_inputs(example_inputs)

        def call() -> Any:
            with torch.inference_mode():
                return xs.call(module)
    else:
        call = fn
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            call()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "runs": float(runs),
    }


def onnx_latency(path: str, example_inputs: Any, *, threads: int = 1, warmup: int = 5, runs: int = 30) -> dict[str, float]:
    """Median and p90 latency (ms) of an ONNX file in onnxruntime on the CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), as_inputs(example_inputs).tensors())}
    return measure_latency(lambda: sess.run(None, feeds), warmup=warmup, runs=runs)


def throughput(
    model: nn.Module, make_input: Callable[[int], Any], batch_sizes: tuple[int, ...] = (1, 8, 32),
    *, threads: int | None = None, runs: int = 10,
) -> dict[int, float]:
    """Samples per second of a module at each batch size (median latency based)."""
    out = {}
    for bs in batch_sizes:
        lat = measure_latency(model, make_input(bs), runs=runs, warmup=2, threads=threads)
        out[bs] = bs / (lat["median_ms"] / 1e3)
    return out


def peak_memory_bytes(model: nn.Module, example_inputs: Any) -> int:
    """Peak bytes the CPU allocator holds during one forward (activations, not weights).

    From torch.profiler's memory events: the running sum of allocations and frees in
    time order, maximised.
    """
    from torch.profiler import ProfilerActivity, profile

    xs = as_inputs(example_inputs)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        xs.call(model.eval())
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage and not e.cpu_children),
        key=lambda e: e.time_range.start,
    )
    held = peak = 0
    for e in events:
        held += e.cpu_memory_usage
        peak = max(peak, held)
    return int(peak)
