"""Pruning toward a measured CPU latency.

MACs are a poor proxy on CPUs (memory-bound depthwise layers, blocked kernels that want
widths in multiples of 8 ...), so this pass measures instead of modelling:

1. time the model (torch eager or onnxruntime, threads pinned, median of runs);
2. probe each prunable group alone: prune `probe` of it, time again; the time saved
   per unit removed is that group's *latency efficiency*;
3. rank all units by importance (normalised per group) divided by their group's
   efficiency, so that cheap-to-lose units in layers that buy time go first;
4. bisect how many units go, timing each candidate, until the measured latency is
   within `tol` of ``target * original``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import fx, nn

from fxslim.errors import PlanMismatchError
from fxslim.graph.coupling import CouplingGraph
from fxslim.passes.policy import Policy, _round, score_groups
from fxslim.passes.prune import apply_plan, make_plan
from fxslim.runtime.measure import measure_latency, onnx_latency

__all__ = ["LATENCY_OPTIONS", "latency_of", "prune_to_latency"]

# what `prune(..., latency_options=...)` passes on to `prune_to_latency`
LATENCY_OPTIONS = ("backend", "threads", "runs", "probe", "tol", "steps", "measure", "macs_target")

logger = logging.getLogger(__name__)


def latency_of(model: nn.Module, example_inputs: Any, backend: str = "torch", threads: int | None = None,
               runs: int = 20) -> float:
    """Median latency in ms on `backend` ("torch" eager or "onnxruntime")."""
    if backend == "torch":
        return measure_latency(model, example_inputs, threads=threads, runs=runs)["median_ms"]
    if backend == "onnxruntime":
        from fxslim.passes.export import export_onnx

        with tempfile.TemporaryDirectory() as d:
            path = export_onnx(model, example_inputs, Path(d) / "m.onnx", dynamic_batch=False).path
            return onnx_latency(path, example_inputs, threads=threads or 1, runs=runs)["median_ms"]
    raise PlanMismatchError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")


def prune_to_latency(
    gm: fx.GraphModule,
    cg: CouplingGraph,
    example_inputs: Any,
    target: float,
    policy: Policy,
    importance: Callable,
    *,
    backend: str = "torch",
    threads: int | None = None,
    runs: int = 20,
    probe: float = 0.5,
    tol: float = 0.05,
    steps: int = 8,
    measure: Callable[[nn.Module], float] | None = None,
    macs_target: float | None = None,
) -> fx.GraphModule:
    """Prune `gm` until its measured latency is `target` x the original (see the module doc).

    Args:
        measure: overrides the timing function (``module -> ms``), e.g. for tests.
        macs_target: instead of a latency, stop at this fraction of the original MACs
            (the probes still decide where the budget goes: latency-aware at equal MACs).

    Returns:
        The pruned GraphModule; ``meta["fxslim_latency"]`` holds (original ms, final ms).
    """
    if macs_target is None and not 0.0 < target < 1.0:
        raise PlanMismatchError(f"target_latency is a fraction in (0, 1), got {target}")
    time_of = measure or (lambda m: latency_of(m, example_inputs, backend, threads, runs))
    base = time_of(gm)
    scores = score_groups(gm, cg, importance, policy.ignore)
    eff = {}
    for gid, s in scores.items():
        n = _round(len(s), int(np.floor(probe * len(s))), policy.round_to, len(s) - 1)
        if n <= 0:
            continue
        units = sorted(np.argsort(s, kind="stable")[:n].tolist())
        t = time_of(apply_plan(gm, cg, make_plan(cg, {gid: units}), example_inputs))
        eff[gid] = max(base - t, 0.0) / n
    pos = [e for e in eff.values() if e > 0]
    floor = (min(pos) if pos else 1.0) * 0.1  # a group that bought nothing still can go, last
    order = []
    for gid, s in scores.items():
        if gid not in eff:
            continue
        w = max(eff[gid], floor)
        norm = s / (np.abs(s).mean() + 1e-12)
        for u in np.argsort(s, kind="stable"):
            order.append((norm[u] / w, gid, int(u)))
    order.sort()
    mr = policy.max_ratio if policy.max_ratio is not None else 1.0
    caps = {gid: min(len(s) - 1, int(np.floor(mr * len(s) + 1e-9))) for gid, s in scores.items()}

    def removal_for(k: int) -> dict[int, list[int]]:
        taken: dict[int, list[int]] = {}
        for _, gid, u in order:
            if k <= 0:
                break
            if len(taken.get(gid, ())) < caps[gid]:
                taken.setdefault(gid, []).append(u)
                k -= 1
        out = {}
        for gid, units in taken.items():
            n = _round(len(scores[gid]), len(units), policy.round_to, caps[gid])
            if n > 0:  # the rounded count, lowest-priority units of this group first
                ranked = [u for _, g, u in order if g == gid]
                out[gid] = sorted(ranked[:n])
        return out

    if macs_target is not None:  # spend a MACs budget where the probes say time is bought
        from fxslim.passes.estimate import CostModel

        cost = CostModel(gm, cg, example_inputs)
        lo, hi, plan = 0, len(order), None
        while lo < hi:
            k = (lo + hi) // 2
            cand = make_plan(cg, removal_for(k))
            if cost.macs(cand.keep, cand.class_removed) / cost.total_macs > macs_target:
                lo = k + 1
            else:
                hi, plan = k, cand
        model = apply_plan(gm, cg, plan or make_plan(cg, removal_for(lo)), example_inputs)
        model.meta["fxslim_latency"] = (base, None)
        return model
    # each candidate is timed next to a fresh timing of the original: the CPU's speed
    # drifts (clocks, caches, other load) and only a side-by-side ratio is trustworthy
    tried = []  # (units removed, ratio, original ms, candidate ms): no models kept, one is rebuilt

    def timed(k: int) -> float:
        cand = apply_plan(gm, cg, make_plan(cg, removal_for(k)), example_inputs)
        t, ref = time_of(cand), time_of(gm)
        tried.append((k, t / ref, ref, t))
        logger.info("latency search: %d units -> %.3f ms / %.3f ms = %.3f (goal %.3f)", k, t, ref, t / ref, target)
        return t / ref

    lo, hi = 0, len(order)
    for _ in range(steps):
        k = (lo + hi) // 2
        ratio = timed(k)
        if abs(ratio - target) <= tol * target:
            break
        lo, hi = (k, hi) if ratio > target else (lo, k)
        if hi - lo <= 1:
            break
    k, ratio, ref, final = min(tried, key=lambda r: abs(r[1] - target))
    floor = min(r[1] for r in tried)
    if floor > target * (1 + tol):
        # out of reach: the latency stopped falling (per-op overhead, memory-bound
        # layers). Removing more buys nothing measurable, so search down for the fewest
        # units within `tol` of the lowest latency measured, rather than take the most.
        lo, hi = 0, min(r[0] for r in tried if r[1] <= floor * (1 + tol))
        for _ in range(steps):
            if hi - lo <= 1:
                break
            k = (lo + hi) // 2
            lo, hi = (lo, k) if timed(k) <= floor * (1 + tol) else (k, hi)
        k, ratio, ref, final = min((r for r in tried if r[1] <= floor * (1 + tol)), key=lambda r: r[0])
        logger.warning(
            "latency target %.2fx not reached: the lowest measured was %.2fx; pruned %d of %d "
            "units, the fewest within %.0f%% of that lowest latency (removing more bought no "
            "time); a milder target, another backend or a larger input measures better",
            target, floor, k, len(order), 100 * tol)
    model = apply_plan(gm, cg, make_plan(cg, removal_for(k)), example_inputs)  # the chosen one again
    if floor > target * (1 + tol):
        model.meta["fxslim_latency_unreached"] = {"target": target, "reached": ratio, "floor": floor}
    model.meta["fxslim_latency"] = (ref, final)
    return model
