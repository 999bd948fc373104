"""Measuring modules on the CPU: parameters, MACs (torch.utils.flop_counter), latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "measure_latency"]


def _tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else tuple(x) if isinstance(x, list) else (x,)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass, from torch.utils.flop_counter (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(*_tuple(example_inputs))
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
    if isinstance(fn, nn.Module):
        module, xs = fn.eval(), _tuple(example_inputs)

        def call() -> Any:
            with torch.inference_mode():
                return module(*xs)
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
