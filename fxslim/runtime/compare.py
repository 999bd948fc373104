"""One table comparing models: parameters, MACs, file size and CPU latency per backend."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from fxslim._args import check_module, positive_int
from fxslim.errors import ArgumentError
from fxslim.runtime.measure import count_macs, count_params, measure_latency, onnx_latency

__all__ = ["compare"]


def compare(
    models: Mapping[str, nn.Module],
    example_inputs: Any,
    *,
    threads: int = 1,
    runs: int = 50,
    onnx: Mapping[str, str] | None = None,
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """A markdown table of params, MACs and median/p90 latency per model; the first is the baseline.

    Args:
        models: {label: module}, baseline first.
        example_inputs: the input used for MACs and latency.
        threads: threads pinned while timing (torch intra-op; onnxruntime intra-op).
        runs: timed runs per model (medians are reported).
        onnx: optional {label: path of its .onnx file}: adds file size and onnxruntime latency.
        extra: optional {label: {column: value}} added as columns (e.g. accuracy).

    Example:
        >>> print(fxslim.compare({"original": model, "pruned": small}, x))
    """
    if not isinstance(models, Mapping) or not models:
        raise ArgumentError(f"models must be a non-empty mapping {{label: module}}, got {type(models).__name__}")
    for label, m in models.items():
        check_module(f"models[{label!r}]", m)
    positive_int("runs", runs)
    positive_int("threads", threads)
    rows = []
    for label, m in models.items():
        lat = measure_latency(m, example_inputs, runs=runs, threads=threads)
        ort = onnx_latency(onnx[label], example_inputs, threads=threads, runs=runs) if onnx else None
        size = os.path.getsize(onnx[label]) if onnx else None
        rows.append((label, count_params(m), count_macs(m, example_inputs), lat, ort, size))
    cols = list(next(iter(extra.values())).keys()) if extra else []
    head = ["model", "params", "MACs", f"torch ms (median, {threads} thr)", "p90 ms", "speed-up"]
    if onnx:
        head += ["onnx MB", "onnxruntime ms", "ort speed-up"]
    head += cols
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0][3]["median_ms"]
    base_ort = rows[0][4]["median_ms"] if onnx else None
    for label, params, macs, lat, ort, size in rows:
        cells = [label, f"{params / 1e6:.3f}M", f"{macs / 1e6:.2f}M", f"{lat['median_ms']:.3f}",
                 f"{lat['p90_ms']:.3f}", f"{base / lat['median_ms']:.2f}x"]
        if onnx:
            cells += [f"{size / 1e6:.2f}", f"{ort['median_ms']:.3f}", f"{base_ort / ort['median_ms']:.2f}x"]
        cells += [extra[label].get(c, "") for c in cols] if extra else []
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
