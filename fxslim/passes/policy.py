"""A first pruning policy: a uniform ratio per group, lowest-importance units first.

For each prunable group, ``floor(ratio * size)`` units are removed (never all of them);
groups touched by an ignored layer's outputs are left whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch.fx as fx
from torch import nn

from fxslim.errors import PlanMismatchError
from fxslim.graph.analysis import analyze
from fxslim.graph.coupling import ChannelGroup, CouplingGraph
from fxslim.graph.trace import trace
from fxslim.passes.base import Pass, PassResult
from fxslim.passes.importance import l1_importance
from fxslim.passes.prune import apply_plan, make_plan

__all__ = ["uniform_removal", "UniformPrunePass", "prune", "prune_to_macs"]

logger = logging.getLogger(__name__)


def _ignored(group: ChannelGroup, ignore: set[str]) -> bool:
    for m in group.members:
        if m.role == "in" or m.kind not in ("param", "buffer"):
            continue  # an ignored layer's input channels may still shrink
        mod = m.module
        if any(mod == p or mod.startswith(p + ".") for p in ignore):
            return True
    return False


def uniform_removal(
    gm: fx.GraphModule,
    cg: CouplingGraph,
    ratio: float,
    ignore: Iterable[str] = (),
    importance: Callable[[nn.Module, ChannelGroup], np.ndarray] = l1_importance,
    round_to: int = 1,
) -> dict[int, list[int]]:
    """{group id: units to remove}: the `ratio` least important units of every prunable group.

    With `round_to` > 1, each group larger than `round_to` keeps a multiple of it (the
    nearest to ``(1 - ratio) * size``), for SIMD-friendly widths.
    """
    if not 0.0 <= ratio < 1.0:
        raise PlanMismatchError(f"ratio must be in [0, 1), got {ratio}")
    ignore = set(ignore)
    removal: dict[int, list[int]] = {}
    cache: dict = {}
    for grp in cg.groups:
        if not grp.prunable or _ignored(grp, ignore):
            continue
        n = min(int(np.floor(ratio * grp.size)), grp.size - 1)
        if round_to > 1 and grp.size > round_to:  # keep a SIMD-friendly number of units
            keep = max(round_to, int(round((grp.size - n) / round_to)) * round_to)
            n = grp.size - min(keep, grp.size)
        if n <= 0:
            continue
        scores = np.asarray(_score(importance, gm, grp, cache), dtype=np.float64)
        removal[grp.id] = sorted(np.argsort(scores, kind="stable")[:n].tolist())
    return removal


def _score(importance: Callable, gm: nn.Module, grp: ChannelGroup, cache: dict) -> np.ndarray:
    if importance is l1_importance:  # per-tensor reductions are shared between groups
        return l1_importance(gm, grp, cache)
    return importance(gm, grp)


class UniformPrunePass(Pass):
    """Remove the same share of units from every prunable group (see `uniform_removal`)."""

    def __init__(self, cg: CouplingGraph, example_inputs: Any, ratio: float, ignore: Iterable[str] = (),
                 importance: Callable = l1_importance, round_to: int = 1):
        self.cg, self.example_inputs, self.ratio = cg, example_inputs, ratio
        self.ignore, self.importance, self.round_to = list(ignore), importance, round_to

    def call(self, gm: fx.GraphModule) -> PassResult:
        removal = uniform_removal(gm, self.cg, self.ratio, self.ignore, self.importance, self.round_to)
        plan = make_plan(self.cg, removal)
        if not plan.keep:
            return PassResult(gm, False, {"plan": plan})
        new = apply_plan(gm, self.cg, plan, self.example_inputs)
        before = sum(p.numel() for p in gm.parameters())
        after = sum(p.numel() for p in new.parameters())
        logger.info("removed %d channels in %d groups", plan.n_removed, len(plan.removed))
        return PassResult(new, after != before, {"plan": plan, "params_before": before, "params_after": after})


def prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.5,
    *,
    ignore: Iterable[str | nn.Module] = (),
    importance: Callable[[nn.Module, ChannelGroup], np.ndarray] = l1_importance,
    round_to: int = 1,
    **trace_kwargs: Any,
) -> fx.GraphModule:
    """Prune every prunable channel group by `ratio`, least important (L1) units first.

    Args:
        model: the model (left untouched).
        example_inputs: a tensor or a tuple of tensors.
        ratio: share of each group's units to remove, in [0, 1).
        ignore: layers (paths or module objects) whose output channels stay whole,
            e.g. the classifier head.
        importance: ``(module, group) -> scores`` (one per unit; higher is kept).
        round_to: keep a multiple of this many units per group (e.g. 8 for SIMD widths).

    Returns:
        A new, smaller GraphModule.

    Example:
        >>> small = fxslim.prune(resnet18(), torch.randn(1, 3, 224, 224), 0.5, ignore=["fc"])
    """
    names = {id(m): n for n, m in model.named_modules()}
    paths = [names.get(id(i), "") if isinstance(i, nn.Module) else str(i) for i in ignore]
    gm = trace(model, example_inputs, share_weights=True, **trace_kwargs)
    cg = analyze(gm)
    return UniformPrunePass(cg, example_inputs, ratio, paths, importance, round_to)(gm).module


def prune_to_macs(
    model: nn.Module,
    example_inputs: Any,
    target: float,
    *,
    ignore: Iterable[str] = (),
    tol: float = 0.02,
    steps: int = 12,
    round_to: int = 1,
) -> tuple[fx.GraphModule, float]:
    """Uniform-ratio pruning whose ratio is bisected until MACs are `target` x the original.

    Returns:
        (pruned module, the ratio used). The MACs fraction reached is within `tol` of
        `target` when the model's prunable groups allow it, else the closest below.
    """
    from fxslim.runtime.measure import count_macs  # noqa: PLC0415

    if not 0.0 < target < 1.0:
        raise PlanMismatchError(f"target must be in (0, 1), got {target}")
    gm = trace(model, example_inputs, share_weights=True)
    cg = analyze(gm)
    base = count_macs(gm, example_inputs)
    lo, hi = 0.0, 0.95
    best: tuple[fx.GraphModule, float, float] | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        res = UniformPrunePass(cg, example_inputs, mid, ignore, round_to=round_to)(gm)
        frac = count_macs(res.module, example_inputs) / base
        if best is None or abs(frac - target) < abs(best[2] - target):
            best = (res.module, mid, frac)
        if abs(frac - target) <= tol * target:
            break
        lo, hi = (mid, hi) if frac > target else (lo, mid)
    return best[0], best[1]
