"""Pruning policy: which channels go and how many.

Scores come from an importance criterion (``fxslim.passes.importance``), one per unit
of each prunable group. How many units each group loses:

* uniform: ``ratio`` of every group (per-module ``overrides`` win where a module is a
  member of the group);
* global ranking: scores normalised per group (divided by the group's mean), pooled
  across groups, lowest first, until ``ratio`` of all units are gone;
* threshold: every unit whose normalised score is below ``threshold``.

Always: a group keeps at least one unit and at most loses ``max_ratio`` of them;
``round_to`` keeps a multiple of N units (SIMD-friendly widths); groups touched by an
ignored layer's outputs stay whole.

Targets (``target_macs`` / ``target_params``, fractions of the original) bisect the
ratio against an exact cost model (``fxslim.passes.estimate``) and never apply a plan
until the chosen one. ``target_latency`` is measured, see ``fxslim.passes.latency``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import fx, nn

from fxslim import _args as A
from fxslim._args import check_module
from fxslim.errors import ArgumentError, PlanMismatchError
from fxslim.graph.analysis import analyze
from fxslim.graph.coupling import ChannelGroup, CouplingGraph
from fxslim.graph.trace import TRACE_OPTIONS, trace
from fxslim.passes.base import Pass, PassResult
from fxslim.passes.estimate import CostModel
from fxslim.passes.importance import Importance, get_importance, l1_importance
from fxslim.passes.prune import PrunePlan, apply_plan, count_parameters, make_plan
from fxslim.utils import gc_paused

__all__ = [
    "PlanReport",
    "Policy",
    "UniformPrunePass",
    "allocate",
    "plan_prune",
    "prune",
    "prune_to_macs",
    "uniform_removal",
]

logger = logging.getLogger(__name__)


@dataclass
class Policy:
    """How many units each group loses (see the module docstring).

    Attributes:
        ratio: share of units to remove (per group, or of all units with global ranking).
        global_ranking: rank units across groups by normalised score.
        threshold: remove units whose normalised score is below it (replaces `ratio`).
        max_ratio: at most this share of any group goes.
        overrides: {module path: ratio} for groups that module is a member of.
        round_to: groups larger than it keep a multiple of it.
        ignore: module paths whose output channels stay whole.
    """

    ratio: float = 0.5
    global_ranking: bool = False
    threshold: float | None = None
    max_ratio: float | None = None
    overrides: Mapping[str, float] = field(default_factory=dict)
    round_to: int = 1
    ignore: Iterable[str] = ()

    def check(self) -> None:
        if self.threshold is None and not 0.0 <= self.ratio < 1.0:
            raise PlanMismatchError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.max_ratio is not None and not 0.0 <= self.max_ratio < 1.0:
            raise PlanMismatchError(f"max_ratio must be in [0, 1), got {self.max_ratio}")
        for k, v in self.overrides.items():
            if not 0.0 <= v < 1.0:
                raise PlanMismatchError(f"override ratio for '{k}' must be in [0, 1), got {v}")
        if self.round_to < 1:
            raise PlanMismatchError(f"round_to must be >= 1, got {self.round_to}")


def _ignored(group: ChannelGroup, ignore: set[str]) -> bool:
    for m in group.members:
        if m.role == "in" or m.kind not in ("param", "buffer"):
            continue  # an ignored layer's input channels may still shrink
        if any(m.module == p or m.module.startswith(p + ".") for p in ignore):
            return True
    return False


def _override(group: ChannelGroup, overrides: Mapping[str, float]) -> float | None:
    hits = [v for k, v in overrides.items() if any(m.module == k for m in group.members if m.kind == "param")]
    return max(hits) if hits else None


def _round(size: int, n: int, round_to: int, cap: int) -> int:
    """Units to remove so that the kept count is a multiple of `round_to` (nearest)."""
    n = min(n, cap)
    if round_to > 1 and size > round_to and n > 0:
        keep = max(round_to, round((size - n) / round_to) * round_to)
        n = size - min(keep, size)
        while n > cap:
            n -= round_to
    return max(n, 0)


def allocate(cg: CouplingGraph, scores: Mapping[int, np.ndarray], policy: Policy) -> dict[int, list[int]]:
    """{group id: units to remove} for the scored groups under `policy`."""
    policy.check()
    mr = policy.max_ratio if policy.max_ratio is not None else 1.0
    caps = {gid: min(len(s) - 1, int(np.floor(mr * len(s) + 1e-9))) for gid, s in scores.items()}
    fixed = {gid: r for gid in scores if (r := _override(cg.groups[gid], policy.overrides)) is not None}
    free = {gid: s / (np.abs(s).mean() + 1e-12) for gid, s in scores.items() if gid not in fixed}
    counts = {gid: int(np.floor(r * len(scores[gid]) + 1e-9)) for gid, r in fixed.items()}
    if policy.threshold is not None:
        counts |= {gid: int((s < policy.threshold).sum()) for gid, s in free.items()}
    elif policy.global_ranking:
        pool = sorted((float(v), gid) for gid, s in free.items() for v in s)
        budget = int(np.floor(policy.ratio * len(pool) + 1e-9))
        taken = dict.fromkeys(free, 0)
        for _, gid in pool:
            if budget <= 0:
                break
            if taken[gid] < caps[gid]:
                taken[gid] += 1
                budget -= 1
        counts |= taken
    else:
        counts |= {gid: int(np.floor(policy.ratio * len(s) + 1e-9)) for gid, s in free.items()}
    removal = {}
    for gid, s in scores.items():
        n = _round(len(s), counts.get(gid, 0), policy.round_to, caps[gid])
        if n > 0:
            removal[gid] = sorted(np.argsort(s, kind="stable")[:n].tolist())
    return removal


@gc_paused
def score_groups(gm: nn.Module, cg: CouplingGraph, importance: Callable, ignore: Iterable[str]) -> dict[int, np.ndarray]:
    """Scores of every prunable, non-ignored group."""
    ignore = set(ignore)
    out = {}
    cache: dict = {}
    if isinstance(importance, Importance):
        importance.reset()
    for grp in cg.groups:
        if not grp.prunable or _ignored(grp, ignore):
            continue
        s = l1_importance(gm, grp, cache) if importance is l1_importance else importance(gm, grp)
        s = np.asarray(s, dtype=np.float64)
        if s.shape != (grp.size,):
            raise PlanMismatchError(f"importance returned shape {s.shape} for group {grp.id} of {grp.size} units")
        out[grp.id] = s
    return out


def uniform_removal(
    gm: fx.GraphModule,
    cg: CouplingGraph,
    ratio: float,
    ignore: Iterable[str] = (),
    importance: Callable[[nn.Module, ChannelGroup], np.ndarray] = l1_importance,
    round_to: int = 1,
) -> dict[int, list[int]]:
    """{group id: units to remove}: the `ratio` least important units of every prunable group."""
    scores = score_groups(gm, cg, importance, ignore)
    return allocate(cg, scores, Policy(ratio=ratio, round_to=round_to, ignore=ignore))


@dataclass
class PlanReport:
    """A dry run: what each group keeps and the cost after, before anything changes.

    Attributes:
        plan: the `PrunePlan` (apply it with `fxslim.apply_plan`).
        rows: per group (id, root, size, kept, pinned reason or "").
        macs / params: before and after (exact, from the cost model).
    """

    plan: PrunePlan
    rows: list[tuple[int, str, int, int, str]]
    macs: tuple[float, float]
    params: tuple[int, int]
    ratio: float | None = None

    def __str__(self) -> str:
        out = ["| group | root | channels | kept | note |", "|---|---|---|---|---|"]
        for gid, root, size, kept, note in self.rows:
            out.append(f"| {gid} | {root} | {size} | {kept} | {note} |")
        m0, m1 = self.macs
        p0, p1 = self.params
        out.append(f"\nMACs {m0 / 1e6:.2f}M -> {m1 / 1e6:.2f}M ({m1 / max(m0, 1):.3f}); "
                   f"params {p0 / 1e6:.3f}M -> {p1 / 1e6:.3f}M ({p1 / max(p0, 1):.3f})")
        return "\n".join(out)


def plan_prune(
    gm: fx.GraphModule,
    cg: CouplingGraph,
    example_inputs: Any,
    policy: Policy,
    importance: Callable = l1_importance,
    *,
    target_macs: float | None = None,
    target_params: float | None = None,
    tol: float = 0.01,
) -> PlanReport:
    """Choose the plan (dry run). With a target, the ratio is bisected on the cost model."""
    cost = CostModel(gm, cg, example_inputs)
    scores = score_groups(gm, cg, importance, policy.ignore)

    def price(p: Policy | PrunePlan) -> tuple[PrunePlan, float, int]:
        plan = p if isinstance(p, PrunePlan) else make_plan(cg, allocate(cg, scores, p))
        return plan, cost.macs(plan.keep, plan.class_removed), cost.params(plan.keep)

    if target_macs is not None or target_params is not None:
        if target_macs is not None and target_params is not None:
            raise PlanMismatchError("give target_macs or target_params, not both")
        goal = target_macs if target_macs is not None else target_params
        if not 0.0 < goal < 1.0:
            raise PlanMismatchError(f"targets are fractions in (0, 1), got {goal}")
        base = cost.total_macs if target_macs is not None else cost.total_params
        which = 1 if target_macs is not None else 2
        lo, hi, best = 0.0, 0.99, None
        for _ in range(30):
            mid = (lo + hi) / 2
            p = Policy(**{**policy.__dict__, "ratio": mid, "threshold": None})
            res = price(p)
            frac = res[which] / base
            if best is None or abs(frac - goal) < abs(best[1][which] / base - goal):
                best = (mid, res)
            if abs(frac - goal) <= tol * goal:
                break
            lo, hi = (mid, hi) if frac > goal else (lo, mid)
        ratio, (plan, macs, params) = best
        if abs((macs if which == 1 else params) / base - goal) > tol * goal:
            ratio, plan, macs, params = _refine(cg, scores, policy, lo, hi, price, which, base, goal) or (
                ratio, plan, macs, params)
        if abs((macs if which == 1 else params) / base - goal) > 0.02 * goal:
            why = (f"widths move in steps of round_to={policy.round_to} channels" if policy.round_to > 1
                   else "groups change by whole units (e.g. attention heads)")
            logger.warning("target %.3f not reachable: closest is %.3f (%s; pinned and ignored groups "
                           "never shrink)", goal, (macs if which == 1 else params) / base, why)
    else:
        ratio = policy.ratio
        plan, macs, params = price(policy)
    rows = []
    for grp in cg.groups:
        gone = len(plan.removed.get(grp.id, ()))
        note = grp.reason or ("ignored" if grp.prunable and grp.id not in scores else "")
        rows.append((grp.id, f"{grp.root.target}[{grp.root.dim}]" if grp.root else "-", grp.size, grp.size - gone, note))
    return PlanReport(plan, rows, (cost.total_macs, macs), (cost.total_params, params), ratio)


def _refine(cg, scores, policy, lo, hi, price, which, base, goal, coarse: int = 32):
    """When a uniform step jumps over the goal (groups of few, large units such as
    attention heads change together), keep the coarse groups (<= `coarse` units) as they
    are at `lo` and bisect the ratio of the fine groups alone."""
    fixed = allocate(cg, scores, Policy(**{**policy.__dict__, "ratio": lo, "threshold": None}))
    frozen = {g for g, s in scores.items() if len(s) <= coarse}
    if not frozen:
        return None

    def plan_at(r: float) -> PrunePlan:
        rem = allocate(cg, scores, Policy(**{**policy.__dict__, "ratio": r, "threshold": None}))
        for g in frozen:
            rem.pop(g, None)
            if fixed.get(g):
                rem[g] = fixed[g]
        return make_plan(cg, rem)

    a, b, best = lo, 0.99, None
    for _ in range(30):
        mid = (a + b) / 2
        res = price(plan_at(mid))
        frac = res[which] / base
        if best is None or abs(frac - goal) < abs(best[1][which] / base - goal):
            best = (mid, res)
        if abs(frac - goal) <= 0.005 * goal:
            break
        a, b = (mid, b) if frac > goal else (a, mid)
    r, (plan, macs, params) = best
    return r, plan, macs, params


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
        before = count_parameters(gm)
        after = sum(p.numel() for p in new.parameters())
        logger.info("removed %d channels in %d groups", plan.n_removed, len(plan.removed))
        return PassResult(new, after != before, {"plan": plan, "params_before": before, "params_after": after})


def prune(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | None = 0.5,
    *,
    ignore: Iterable[str | nn.Module] = (),
    importance: str | Callable[[nn.Module, ChannelGroup], np.ndarray] | None = None,
    global_ranking: bool = False,
    threshold: float | None = None,
    max_ratio: float | None = None,
    overrides: Mapping[str, float] | None = None,
    round_to: int = 1,
    target_macs: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    latency_options: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    keep_classes: bool = True,
    **trace_kwargs: Any,
) -> nn.Module | PlanReport:
    """Prune channel groups, least important units first.

    Args:
        model: the model (left untouched).
        example_inputs: a tensor, a tuple of tensors, or a dict / transformers
            ``BatchEncoding`` of keyword inputs (see `fxslim.trace`; a transformers model
            is captured by torch.export, and the pruned GraphModule then runs on inputs of
            the example's shapes only).
        ratio: share of units to remove, in [0, 1) (per group; of all units with
            `global_ranking`). Ignored when a target is given.
        ignore: layers (paths or module objects) whose output channels stay whole.
        importance: "l1" (default), "l2", "bn", "lamp", "random", or any
            ``(module, group) -> scores`` (see ``fxslim.passes.importance``); one with a
            ``calibrate(model)`` method (``fxslim.passes.calibrated.WandaImportance(batches)``)
            first records its calibration statistics on `model`.
        global_ranking: rank units across groups by per-group normalised score.
        threshold: remove units whose normalised score is below it.
        max_ratio: at most this share of any group goes.
        overrides: {module path: ratio} for the groups that module belongs to.
        round_to: keep a multiple of this many units per group (e.g. 8 for SIMD).
        target_macs / target_params: reach this fraction of the original (exact cost
            model, bisected ratio).
        target_latency: reach this fraction of the measured CPU latency
            (``fxslim.passes.latency``; options in `latency_options`).
        dry_run: return the `PlanReport` (a printable table) instead of a model.
        keep_classes: return the pruned model as the user's own classes (a copy with
            sliced tensors and updated size attributes, proven equal to the rewritten
            graph; see ``fxslim.passes.keep_classes``), falling back to the torch.fx
            GraphModule where that cannot be proven (the reason is logged). False: always
            the GraphModule.

    Returns:
        A new, smaller model (the user's classes, or a GraphModule), or the `PlanReport`
        with `dry_run`.

    Example:
        >>> small = fxslim.prune(resnet18(), x, target_macs=0.5, round_to=8, ignore=["fc"])
        >>> print(fxslim.prune(resnet18(), x, 0.3, dry_run=True))
    """
    check_module("model", model)
    targets = {"target_macs": target_macs, "target_params": target_params, "target_latency": target_latency}
    for name, value in targets.items():
        A.fraction(name, value, zero=False, none=True)
    if sum(v is not None for v in targets.values()) > 1:
        raise ArgumentError(f"give one target, got {[k for k, v in targets.items() if v is not None]}")
    policy = Policy(
        ratio=A.fraction("ratio", ratio, none=True) if ratio is not None else 0.5,
        global_ranking=bool(global_ranking),
        threshold=A.number("threshold", threshold, none=True),
        max_ratio=A.fraction("max_ratio", max_ratio, none=True),
        overrides=A.ratio_map(model, overrides, "overrides"),
        round_to=A.positive_int("round_to", round_to),
        ignore=A.module_paths(model, ignore, "ignore"),
    )
    if latency_options is not None and not isinstance(latency_options, Mapping):
        raise ArgumentError(f"latency_options must be a mapping, got {type(latency_options).__name__}")
    if latency_options:
        from fxslim.passes.latency import LATENCY_OPTIONS

        A.known_names("latency_options", latency_options, LATENCY_OPTIONS)
    A.known_names("prune() keyword", trace_kwargs, TRACE_OPTIONS)
    crit = get_importance(importance) if importance is not None else l1_importance
    if callable(getattr(crit, "calibrate", None)):  # activation-aware: hooks on the user's own modules
        crit.calibrate(model)
    finish = _finisher(model, example_inputs, keep_classes, trace_kwargs)
    if target_latency is None and target_macs is None and target_params is None and not dry_run:
        return finish(_prune_once(model, example_inputs, policy, crit, trace_kwargs))  # no pricing needed
    gm = trace(model, example_inputs, share_weights=True, **trace_kwargs)
    cg = analyze(gm)
    if target_latency is not None:
        from fxslim.passes.latency import prune_to_latency

        return finish(prune_to_latency(gm, cg, example_inputs, target_latency, policy, crit,
                                       **(latency_options or {})))
    report = plan_prune(gm, cg, example_inputs, policy, crit, target_macs=target_macs, target_params=target_params)
    if dry_run:
        return report
    return finish(apply_plan(gm, cg, report.plan, example_inputs, inplace=True))


def _finisher(model: nn.Module, example_inputs: Any, keep: bool,
              trace_kwargs: Mapping[str, Any]) -> Callable[[fx.GraphModule], nn.Module]:
    """The last step of every prune: the user's classes back where proven (or not asked)."""
    if not isinstance(keep, bool):
        raise ArgumentError(f"keep_classes must be True or False, got {keep!r}")
    if not keep:
        return lambda gm: gm
    from fxslim.passes.keep_classes import keep_classes

    return lambda gm: keep_classes(model, gm, example_inputs, trace_kwargs)


@gc_paused  # one collector pause over the four passes: survivors are scanned once, not per pass
def _prune_once(model: nn.Module, example_inputs: Any, policy: Policy, crit: Callable,
                trace_kwargs: Mapping[str, Any]) -> fx.GraphModule:
    gm = trace(model, example_inputs, share_weights=True, **trace_kwargs)
    cg = analyze(gm)
    plan = make_plan(cg, allocate(cg, score_groups(gm, cg, crit, policy.ignore), policy))
    return apply_plan(gm, cg, plan, example_inputs, inplace=True)  # gm is this call's own


def prune_to_macs(
    model: nn.Module,
    example_inputs: Any,
    target: float,
    *,
    ignore: Iterable[str] = (),
    round_to: int = 1,
) -> tuple[fx.GraphModule, float]:
    """Uniform pruning to `target` x the original MACs; returns (module, ratio used)."""
    gm = trace(model, example_inputs, share_weights=True)
    cg = analyze(gm)
    report = plan_prune(gm, cg, example_inputs, Policy(round_to=round_to, ignore=list(ignore)), l1_importance,
                        target_macs=target)
    return apply_plan(gm, cg, report.plan, example_inputs, inplace=True), report.ratio
