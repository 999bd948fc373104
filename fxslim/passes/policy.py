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

__all__ = ["uniform_removal", "UniformPrunePass", "prune"]

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
) -> dict[int, list[int]]:
    """{group id: units to remove}: the `ratio` least important units of every prunable group."""
    if not 0.0 <= ratio < 1.0:
        raise PlanMismatchError(f"ratio must be in [0, 1), got {ratio}")
    ignore = set(ignore)
    removal: dict[int, list[int]] = {}
    cache: dict = {}
    for grp in cg.groups:
        if not grp.prunable or _ignored(grp, ignore):
            continue
        n = min(int(np.floor(ratio * grp.size)), grp.size - 1)
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
                 importance: Callable = l1_importance):
        self.cg, self.example_inputs, self.ratio = cg, example_inputs, ratio
        self.ignore, self.importance = list(ignore), importance

    def call(self, gm: fx.GraphModule) -> PassResult:
        removal = uniform_removal(gm, self.cg, self.ratio, self.ignore, self.importance)
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

    Returns:
        A new, smaller GraphModule.

    Example:
        >>> small = fxslim.prune(resnet18(), torch.randn(1, 3, 224, 224), 0.5, ignore=["fc"])
    """
    names = {id(m): n for n, m in model.named_modules()}
    paths = [names.get(id(i), "") if isinstance(i, nn.Module) else str(i) for i in ignore]
    gm = trace(model, example_inputs, share_weights=True, **trace_kwargs)
    cg = analyze(gm)
    return UniformPrunePass(cg, example_inputs, ratio, paths, importance)(gm).module
