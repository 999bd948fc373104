"""Physical channel removal.

A removal names, per channel group, the units to drop. It becomes a `PrunePlan`: for
every member (parameter or buffer, dim) the indices it keeps. Applying the plan to a
copy of the traced module slices every member with ``index_select``, updates module
attributes (``out_channels``, ``groups``, ``num_heads`` ...), rewrites the literal sizes
left in the graph (view shapes, split sections, slice bounds, layer_norm shapes), then
re-propagates shapes: a producer/consumer mismatch fails there, not in the user's hands.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxslim._args import check_module, closest, known_names
from fxslim._inputs import as_inputs
from fxslim.errors import (
    ArgumentError,
    PassContractError,
    PinnedChannelsError,
    PlanMismatchError,
    RuleError,
    TraceError,
)
from fxslim.graph import rules as R
from fxslim.graph.coupling import ChannelGroup, CouplingGraph, Member, where
from fxslim.graph.run_capture import RUN_MODEL
from fxslim.graph.shapes import propagate_shapes
from fxslim.graph.trace import copy_structure
from fxslim.passes.base import Pass, PassResult
from fxslim.utils import gc_paused

__all__ = [
    "PruneChannelsPass",
    "PrunePlan",
    "apply_plan",
    "count_parameters",
    "find_member",
    "make_plan",
    "plan_record",
    "prune_channels",
    "slice_tensors",
]

logger = logging.getLogger(__name__)


@dataclass
class PrunePlan:
    """What a prune keeps.

    Attributes:
        removed: group id -> sorted unit ordinals removed from that group.
        keep: (target, dim) -> kept indices along dim, for every member that changes.
        class_removed: coupling class -> boolean mask of removed elements.
    """

    removed: dict[int, list[int]]
    keep: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    class_removed: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n_removed(self) -> int:
        return sum(len(u) for u in self.removed.values())


def make_plan(cg: CouplingGraph, removal: Mapping[int, Iterable[int]], *, allow_pinned: bool = False) -> PrunePlan:
    """Turn {group id: units to remove} into a `PrunePlan`.

    Raises:
        PinnedChannelsError: a group is pinned (the message says why).
        PlanMismatchError: unknown group or unit, or a group would be emptied.
    """
    removed: dict[int, list[int]] = {}
    class_removed: dict[int, np.ndarray] = {}
    members: dict[Member, int] = {}
    for gid, units in removal.items():
        units = sorted({int(u) for u in units})
        if not units:
            continue
        if not 0 <= gid < len(cg.groups):
            raise PlanMismatchError(f"no channel group {gid} (the model has {len(cg.groups)})")
        grp = cg.groups[gid]
        if not grp.prunable and not allow_pinned:
            raise PinnedChannelsError(f"channel group {gid} ({grp.root.target}) is pinned: {grp.reason}")
        if units[0] < 0 or units[-1] >= grp.size:
            raise PlanMismatchError(f"group {gid} has {grp.size} channels; asked to remove {units}")
        if len(units) >= grp.size:
            raise PlanMismatchError(f"removing all {grp.size} channels of group {gid} would empty it")
        removed[gid] = units
        gone = np.zeros(grp.size + 1, dtype=bool)  # the extra last slot answers unit -1
        gone[units] = True
        for c, unit_of in grp.unit_of.items():
            mask = gone[unit_of]
            class_removed[c] = class_removed[c] | mask if c in class_removed else mask
        members.update(grp.member_class)
    keep: dict[tuple[str, int], np.ndarray] = {}
    for m, c in members.items():
        if m.kind not in ("param", "buffer"):
            continue  # attributes and literals are rewritten from the new shapes
        mask = class_removed.get(c)
        if mask is None or not mask.any():
            continue
        kept = np.nonzero(~mask)[0]
        if len(kept) == 0:
            raise PlanMismatchError(f"the plan removes every channel of {m.target} dim {m.dim}")
        keep[(m.target, m.dim)] = kept
    return PrunePlan(removed, keep, class_removed)


def plan_record(cg: CouplingGraph, plan: PrunePlan) -> dict[str, Any]:
    """A JSON-able record of a plan: per changed group, its root member and kept units."""
    same_root: dict[Any, list[int]] = defaultdict(list)  # groups sharing a root: a split conv output
    for g in cg.groups:
        same_root[g.root].append(g.id)
    groups = []
    for gid, units in sorted(plan.removed.items()):
        grp = cg.groups[gid]
        groups.append({
            "root": grp.root.target, "dim": grp.root.dim, "nth": same_root[grp.root].index(gid), "size": grp.size,
            "kept": np.delete(np.arange(grp.size), units).tolist(),
        })
    return {"groups": groups}


def _compose_keep(prev: dict[str, np.ndarray], keep: dict[tuple[str, int], np.ndarray]) -> dict[str, np.ndarray]:
    """Indices into the *original* model kept per "target:dim", across successive prunes."""
    out = dict(prev)
    for (target, dim), kept in keep.items():
        key = f"{target}:{dim}"
        out[key] = np.asarray(prev[key])[kept] if key in prev else kept
    return out


def find_recorded_group(cg: CouplingGraph, entry: dict[str, Any]) -> ChannelGroup | None:
    """The group a `plan_record` entry names, or None."""
    same = [g for g in cg.groups if g.root is not None and g.root.target == entry["root"]
            and g.root.dim == entry["dim"]]
    n = entry.get("nth", 0)
    return same[n] if n < len(same) else None


def count_parameters(m: nn.Module) -> int:
    """Parameter count of a model, or of the tree a run capture ran (its graph holds only
    the parameters the run read)."""
    tree = m.meta.get(RUN_MODEL, m) if isinstance(m, fx.GraphModule) else m
    return sum(p.numel() for p in tree.parameters())


def _owner(modules: Mapping[str, nn.Module], target: str) -> tuple[nn.Module, str]:
    owner_path, _, name = target.rpartition(".")
    return modules[owner_path], name


def _get_tensor(gm: nn.Module, target: str) -> torch.Tensor:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, name)


def slice_tensors(new: nn.Module, plan: PrunePlan, syncs: Callable[[nn.Module], list] | None = None
                  ) -> dict[str, nn.Module]:
    """Slice `new`'s tensors in place by `plan.keep`, give it its own copy of every other
    tensor, and bring each changed module's size attributes in line (its rule's ``sync``,
    or `syncs(mod)`). Returns ``dict(new.named_modules())``."""
    modules = dict(new.named_modules())
    by_target: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (target, dim), kept in plan.keep.items():
        by_target[target].append((dim, kept))
    with torch.no_grad():
        # whatever is not sliced below is still the analysed module's tensor: own a copy
        # (one copy per tensor, so weights tied across modules stay tied)
        copies: dict[int, torch.Tensor] = {}
        for path, owner in modules.items():
            prefix = f"{path}." if path else ""
            for table in (owner._parameters, owner._buffers):
                for name, t in table.items():
                    if t is None or prefix + name in by_target:
                        continue
                    clone = copies.get(id(t))
                    if clone is None:
                        clone = t.detach().clone()
                        if isinstance(t, nn.Parameter):
                            clone = nn.Parameter(clone, requires_grad=t.requires_grad)
                        for hook in (getattr(t, "_backward_hooks", None) or {}).values():
                            clone.register_hook(hook)  # gradient hooks (their modules stay whole)
                        copies[id(t)] = clone
                    table[name] = clone
        for target, cuts in by_target.items():
            owner, name = _owner(modules, target)
            old = getattr(owner, name)
            t = _slice(old.detach(), cuts)
            if isinstance(old, nn.Parameter):
                owner._parameters[name] = nn.Parameter(t.contiguous(), requires_grad=old.requires_grad)
            else:
                owner._buffers[name] = t.contiguous()
    for path in sorted({t.rpartition(".")[0] for t in by_target}):
        mod = modules.get(path)
        if mod is None:
            continue
        fns = syncs(mod) if syncs is not None else [R.sync_of(mod)]
        try:
            for sync in fns:
                if sync is not None:
                    sync(mod)
        except Exception as exc:
            raise RuleError(f"updating the size attributes of {type(mod).__name__} at '{path}' after "
                            f"slicing failed ({type(exc).__name__}: {exc})") from exc
    return modules


@gc_paused
def apply_plan(gm: fx.GraphModule, cg: CouplingGraph, plan: PrunePlan, example_inputs: Any, *,
               inplace: bool = False) -> fx.GraphModule:
    """Apply `plan` to a copy of `gm` (the analysed module) and return the copy.

    With `inplace`, `gm` itself is rewritten (for callers that own it, e.g. a module
    `fxslim.trace` made for this prune alone); `cg` describes the old graph afterwards.
    Either way the result owns its tensors: it shares none with `gm`'s original ones.
    A run capture (``capture="run"``) has no graph to rewrite: the result is the user's
    own classes, sliced (`fxslim.passes.run_rewrite`).
    """
    if gm.meta.get("fxslim_capture", {}).get("kind") == "run":  # no graph to rewrite: the user's classes
        from fxslim.passes.run_rewrite import apply_plan_to_classes

        return apply_plan_to_classes(gm, cg, plan, example_inputs)
    new = gm if inplace else copy_structure(gm)  # tensors shared until sliced or cloned below
    history = list(gm.meta.get("fxslim_history", [])) + [plan_record(cg, plan)]
    keep = _compose_keep(gm.meta.get("fxslim_keep", {}), plan.keep)
    modules = slice_tensors(new, plan)
    _fix_literals(new, gm, cg, plan, modules)
    new.meta["fxslim_history"] = history
    new.meta["fxslim_keep"] = keep
    new.recompile()  # lazily: the code is generated on first use (a class-kept result never needs it)
    try:  # also the check that every rewritten size agrees: each node runs on meta tensors
        propagate_shapes(new, as_inputs(example_inputs).flat(new))
    except TraceError as exc:
        raise PassContractError(
            f"pass author: the pruned graph no longer runs (a producer/consumer size disagrees): {exc}"
        ) from exc
    return new


_NUMPY_SLICE_MAX = 1 << 16  # up to this many elements, slicing goes through numpy (a fifth of torch's per-call cost)
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool, torch.uint8)


def _slice(t: torch.Tensor, cuts: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """`t` keeping `kept` along each cut dim. Rows and columns of a conv kernel are
    gathered in one pass (kernel blocks by flat index): no half-size intermediate."""
    dims = sorted(d for d, _ in cuts)
    if dims == [0, 1] and t.dim() > 2 and t[0, 0].numel() > 1 and t.numel() > _NUMPY_SLICE_MAX:
        k = dict(cuts)
        d1 = t.shape[1]
        flat = (torch.as_tensor(k[0])[:, None] * d1 + torch.as_tensor(k[1])[None, :]).reshape(-1)
        out = t.reshape(t.shape[0] * d1, -1).index_select(0, flat.to(t.device))
        return out.reshape(len(k[0]), len(k[1]), *t.shape[2:])
    for dim, kept in sorted(cuts, key=lambda c: c[0]):  # whole rows first: the later gathers read less
        t = _take(t, dim, kept)
    return t


def _take(t: torch.Tensor, dim: int, kept: np.ndarray) -> torch.Tensor:
    """`t.index_select(dim, kept)`, for small CPU tensors by numpy."""
    if t.device.type == "cpu" and t.numel() <= _NUMPY_SLICE_MAX and t.dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.take(t.numpy(), kept, axis=dim))
    return t.index_select(dim, torch.as_tensor(kept, device=t.device))


def _fix_literals(new: fx.GraphModule, old: fx.GraphModule, cg: CouplingGraph, plan: PrunePlan,
                  modules: Mapping[str, nn.Module]) -> None:
    b = cg.builder
    old_nodes = {n.name: n for n in old.graph.nodes}

    def spaces(node: fx.Node) -> Any:
        return b.out.get(old_nodes[node.name])

    def new_sizes(node: fx.Node, idx: int | None) -> tuple[int, ...]:
        sp = spaces(node)
        if idx is not None:
            sp = sp[idx]
        return tuple(cg.new_size(s, plan.class_removed) for s in sp)

    def kept(node: fx.Node, d: int) -> np.ndarray | None:
        s = spaces(node)[d]
        mask = plan.class_removed.get(int(cg.class_of[s]))
        return None if mask is None else ~mask

    def dynamic(node: fx.Node) -> list[bool]:
        return [cg.is_dynamic(s) for s in spaces(node)]

    for node in new.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        rule = R.lookup_rule(node, modules.get(node.target) if node.op == "call_module" else None)
        if rule is None or rule.fix_literals is None:
            continue
        # always: a size argument may be computed from a pruned dim elsewhere in the graph
        try:
            rule.fix_literals(node, new_sizes, kept, dynamic)
        except Exception as exc:
            raise RuleError(
                f"rewriting the sizes written in {where(node, new)} failed ({type(exc).__name__}: {exc}).\n"
                f"  node: {node.format_node()}"
            ) from exc


def find_member(cg: CouplingGraph, gm: fx.GraphModule, layer: str) -> tuple[Member, list[ChannelGroup]]:
    """The output-channel member of `layer` and the groups its channels belong to."""
    cands = [m for g in cg.groups for m in g.members if m.role == "out" and m.module == layer]
    if not cands:
        try:
            gm.get_submodule(layer)
        except AttributeError:
            known = [n for n, _ in gm.named_modules() if n]
            raise PlanMismatchError(f"the model has no layer '{layer}'{closest(layer, known)}") from None
        raise PlanMismatchError(
            f"layer '{layer}' produces no channels fxslim can prune (no weight rows in any group)"
        )
    weight = [m for m in cands if m.target.endswith(".weight")]
    member = (weight or cands)[0]
    groups = [g for g in cg.groups if member in g.member_class]
    return member, groups


class PruneChannelsPass(Pass):
    """Remove output channels of named layers and everything coupled to them.

    Args:
        cg: the coupling graph of the module the pass will run on.
        request: {layer path: output-channel indices}.
        example_inputs: used to re-propagate shapes after the rewrite.
    """

    def __init__(self, cg: CouplingGraph, request: Mapping[str, Iterable[int]], example_inputs: Any):
        self.cg, self.request, self.example_inputs = cg, request, example_inputs
        self.plan: PrunePlan | None = None

    def call(self, gm: fx.GraphModule) -> PassResult:
        removal: dict[int, set[int]] = defaultdict(set)
        for layer, idx in self.request.items():
            idx = sorted({int(i) for i in idx})
            member, groups = find_member(self.cg, gm, layer)
            size = _get_tensor(gm, member.target).shape[member.dim]
            if idx and (idx[0] < 0 or idx[-1] >= size):
                raise PlanMismatchError(f"layer '{layer}' has {size} output channels; asked for {idx}")
            covered: set[int] = set()
            for grp in groups:
                units = grp.units_of(member, idx)
                units = units[units >= 0]
                if len(units) == 0:
                    continue
                if not grp.prunable:
                    raise PinnedChannelsError(
                        f"channels {idx} of '{layer}' cannot be pruned: {grp.reason}"
                    )
                covered |= set(grp.channels_of(member, units).tolist())
                removal[grp.id] |= set(units.tolist())
            extra = sorted(covered - set(idx))
            if extra:
                raise PlanMismatchError(
                    f"channels {idx} of '{layer}' are coupled to its channels {extra} "
                    f"(one unit: a conv group or an attention head); include them too"
                )
        self.plan = make_plan(self.cg, removal)
        before = count_parameters(gm)
        new = apply_plan(gm, self.cg, self.plan, self.example_inputs)
        after = sum(p.numel() for p in new.parameters())
        return PassResult(new, before != after, {"plan": self.plan, "params_before": before, "params_after": after})


def prune_channels(model: nn.Module, example_inputs: Any, request: Mapping[str, Iterable[int]], *,
                   keep_classes: bool = True, **trace_kwargs) -> nn.Module:
    """Remove output channels of layers, and everything coupled to them, physically.

    Args:
        model: the model (left untouched).
        example_inputs: a tensor, a tuple of tensors or a dict of keyword inputs (see `fxslim.trace`).
        request: {layer path: output-channel indices to remove}, e.g.
            ``{"layer1.0.conv1": [3, 7]}``.
        keep_classes: return the user's own classes where proven (see `fxslim.prune`);
            False: always the torch.fx GraphModule.

    Returns:
        A new, smaller model (the user's classes, or a GraphModule) that runs, traces
        again and can be pruned again.

    Raises:
        PinnedChannelsError: the channels belong to a pinned group (the reason says why).
        PlanMismatchError: unknown layer, out-of-range index, or indices that split a unit.

    Example:
        >>> small = fxslim.prune_channels(resnet18(), x, {"layer1.0.conv1": [3, 7]})
    """
    from fxslim.graph.analysis import analyze
    from fxslim.graph.trace import TRACE_OPTIONS, trace

    check_module("model", model)
    if not isinstance(keep_classes, bool):
        raise ArgumentError(f"keep_classes must be True or False, got {keep_classes!r}")
    known_names("prune_channels() keyword", trace_kwargs, TRACE_OPTIONS)
    if not isinstance(request, Mapping):
        raise ArgumentError(f"request must be a mapping {{layer path: channel indices}}, got {type(request).__name__}")
    request = {layer: list(idx) if isinstance(idx, Iterable) and not isinstance(idx, (str, bytes)) else idx
               for layer, idx in request.items()}
    for layer, idx in request.items():
        if not isinstance(layer, str) or not isinstance(idx, list) \
                or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in idx):
            raise ArgumentError(f"request entries must be 'layer path': [channel indices, ...], got {layer!r}: {idx!r}")
    gm = trace(model, example_inputs, share_weights=True, **trace_kwargs)
    cg = analyze(gm)
    small = PruneChannelsPass(cg, request, example_inputs)(gm).module
    if not keep_classes:
        return small
    from fxslim.passes.keep_classes import keep_classes as keep

    return keep(model, small, example_inputs, trace_kwargs)
