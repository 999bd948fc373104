"""Iterative pruning: reach a target in N steps, re-scoring after each, with a user
callback between steps (fine-tune, distil, log).

Step k of N prunes to ``1 - (1 - target) * k / N`` of the original MACs (or params), so
the model shrinks linearly and each step's scores see the previous steps' recovery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fxslim.errors import ArgumentError, PlanMismatchError
from fxslim.graph.analysis import analyze
from fxslim.graph.trace import trace
from fxslim.passes.importance import get_importance, l1_importance
from fxslim.passes.keep_classes import keep_classes as keep
from fxslim.passes.policy import Policy, plan_prune
from fxslim.passes.prune import apply_plan
from fxslim.runtime.measure import count_macs, count_params

__all__ = ["prune_iteratively"]


def prune_iteratively(
    model: nn.Module,
    example_inputs: Any,
    *,
    steps: int,
    target_macs: float | None = None,
    target_params: float | None = None,
    callback: Callable[[nn.Module, int], nn.Module | None] | None = None,
    importance: Any = None,
    keep_classes: bool = True,
    **policy: Any,
) -> nn.Module:
    """Prune to `target_macs` (or `target_params`) of the original in `steps` steps.

    Args:
        callback: ``callback(model, step)`` after each step; it may train the model in
            place or return a replacement (e.g. a distilled copy).
        importance: as in `fxslim.prune`; data-driven criteria re-score every step.
        keep_classes: after each step, the model as its own classes where proven (see
            `fxslim.prune`); False: GraphModules throughout.
        policy: `Policy` fields (round_to, global_ranking, max_ratio, ignore ...).

    Returns:
        The final pruned model (its own classes, or a GraphModule).

    Example:
        >>> small = prune_iteratively(model, x, steps=3, target_macs=0.5,
        ...                           callback=lambda m, k: fit(m, train, epochs=1))
    """
    if not isinstance(keep_classes, bool):
        raise ArgumentError(f"keep_classes must be True or False, got {keep_classes!r}")
    if steps < 1 or (target_macs is None) == (target_params is None):
        raise PlanMismatchError("give steps >= 1 and exactly one of target_macs / target_params")
    goal = target_macs if target_macs is not None else target_params
    measure = (lambda m: count_macs(m, example_inputs)) if target_macs is not None else count_params
    crit = get_importance(importance) if importance is not None else l1_importance
    base = measure(model)
    current: nn.Module = model
    for k in range(1, steps + 1):
        want = 1.0 - (1.0 - goal) * k / steps  # of the original
        gm = trace(current, example_inputs, share_weights=True)
        cg = analyze(gm)
        rel = min(0.999, want * base / measure(gm))
        kw = {"target_macs": rel} if target_macs is not None else {"target_params": rel}
        report = plan_prune(gm, cg, example_inputs, Policy(**policy), crit, **kw)
        pruned = apply_plan(gm, cg, report.plan, example_inputs, inplace=True)  # gm is this step's own
        current = keep(current, pruned, example_inputs, {}) if keep_classes else pruned
        if callback is not None:
            out = callback(current, k)
            current = out if out is not None else current
    return current
