"""One table comparing models: parameters, MACs and CPU latency, with speed-ups."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fxslim.runtime.measure import count_macs, count_params, measure_latency

__all__ = ["compare"]


def compare(
    models: Mapping[str, nn.Module],
    example_inputs: Any,
    *,
    threads: int = 1,
    runs: int = 50,
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """A markdown table of params, MACs and median/p90 latency per model; the first is the baseline.

    Args:
        models: {label: module}, baseline first.
        example_inputs: the input used for MACs and latency.
        threads: torch threads pinned while timing.
        runs: timed runs per model (medians are reported).
        extra: optional {label: {column: value}} added as columns (e.g. accuracy).

    Example:
        >>> print(fxslim.compare({"original": model, "pruned": small}, x))
    """
    rows = []
    for label, m in models.items():
        lat = measure_latency(m, example_inputs, runs=runs, threads=threads)
        rows.append((label, count_params(m), count_macs(m, example_inputs), lat))
    cols = list(next(iter(extra.values())).keys()) if extra else []
    head = ["model", "params", "MACs", f"latency ms (median, {threads} thr)", "p90 ms", "speed-up", *cols]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0][3]["median_ms"]
    for label, params, macs, lat in rows:
        cells = [label, f"{params / 1e6:.3f}M", f"{macs / 1e6:.2f}M", f"{lat['median_ms']:.3f}",
                 f"{lat['p90_ms']:.3f}", f"{base / lat['median_ms']:.2f}x"]
        cells += [extra[label].get(c, "") for c in cols] if extra else []
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
