"""Correctness oracles for rewrites (DESIGN.md), usable in tests and by users.

1. Slicing consistency: every tensor a prune changed equals the original indexed by the
   kept channels on the right dim; every other tensor is unchanged.
2. Dead-channel equivalence: zero every member slice of the channels to be removed in
   the original (producer rows, consumer columns, norm affines); then its outputs equal
   the pruned model's. For a run capture both sides are the user's own classes run
   eagerly (the graph is a record, never run). Exact in real arithmetic for groups that pass no statistic over
   channels (`ChannelGroup.stat` is False); a misplaced index anywhere breaks it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fxslim._inputs import as_inputs
from fxslim.graph.coupling import CouplingGraph
from fxslim.graph.run_capture import RUN_MODEL
from fxslim.graph.trace import copy_structure
from fxslim.passes.prune import PrunePlan, apply_plan, make_plan

__all__ = ["dead_channel_check", "max_scaled_diff", "slicing_mismatches", "zero_channels"]


def slicing_mismatches(original: nn.Module, pruned: nn.Module, plan: PrunePlan) -> list[str]:
    """Tensors of `pruned` that are not the original sliced by `plan.keep` (empty when right)."""
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (target, dim), kept in plan.keep.items():
        cuts.setdefault(target, []).append((dim, kept))
    bad = []
    original = _reference(original)
    orig = dict(original.named_parameters()) | dict(original.named_buffers())
    for name, t in list(pruned.named_parameters()) + list(pruned.named_buffers()):
        if name not in orig:
            bad.append(f"{name}: not in the original")
            continue
        ref = orig[name].detach()
        for dim, kept in cuts.get(name, ()):
            ref = ref.index_select(dim, torch.as_tensor(kept))
        if ref.shape != t.shape or not torch.equal(ref, t.detach()):
            bad.append(f"{name}: {tuple(t.shape)} is not the original sliced to {tuple(ref.shape)}")
    return bad


def _reference(gm: nn.Module) -> nn.Module:
    """What a pruned model is compared with: the analysed module, or for a run capture
    (whose graph is never run) the module tree it ran."""
    model = getattr(gm, "meta", {}).get(RUN_MODEL)
    return gm if model is None else model


def zero_channels(gm: nn.Module, plan: PrunePlan) -> nn.Module:
    """A copy of `gm` whose parameter entries that `plan` removes are all zero.

    Only the parameters that change are copied; the rest are shared with `gm` (a whole
    copy of a 600M-parameter model is 2.5 GB)."""
    dead = copy_structure(gm)
    modules = dict(dead.named_modules())
    zeroed: dict[str, nn.Parameter] = {}
    with torch.no_grad():
        for (target, dim), kept in plan.keep.items():
            owner_path, _, name = target.rpartition(".")
            owner = modules[owner_path]
            t = owner._parameters.get(name)
            if t is None:
                continue
            if target not in zeroed:
                zeroed[target] = owner._parameters[name] = nn.Parameter(t.detach().clone(), t.requires_grad)
            t = zeroed[target]
            mask = torch.ones(t.shape[dim], dtype=torch.bool)
            mask[torch.as_tensor(kept)] = False
            idx = torch.nonzero(mask).flatten()
            t.index_fill_(dim, idx, 0.0)
    return dead


def max_scaled_diff(a: Any, b: Any) -> float:
    """max |a - b| / (max |a| + 1e-12) over (nested) outputs."""
    fa, fb = _flat(a), _flat(b)
    if len(fa) != len(fb):
        return float("inf")
    worst = 0.0
    for x, y in zip(fa, fb):
        if x.shape != y.shape:
            return float("inf")
        scale = x.abs().max().item() + 1e-12
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().float()]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    return []


def dead_channel_check(
    gm: nn.Module,
    cg: CouplingGraph,
    removal: Mapping[int, Iterable[int]],
    example_inputs: Any,
    inputs: Any = None,
    at: Iterable[str] = (),
) -> tuple[float, nn.Module, PrunePlan]:
    """Run the dead-channel oracle; returns (max scaled output difference, pruned, plan).

    Args:
        gm: the analysed GraphModule (eval mode).
        cg: its coupling graph.
        removal: {group id: units}; use only groups with ``stat == False``.
        example_inputs: the inputs the module was traced with.
        inputs: inputs to compare outputs on (default: `example_inputs`).
        at: module paths whose outputs are compared instead of the model's (recorded by
            forward hooks): a detector's raw head outputs, before postprocessing whose
            ranking (top-k, NMS over near-equal random scores) turns float rounding into
            reordered detections.
    """
    plan = make_plan(cg, removal)
    xs = as_inputs(inputs if inputs is not None else example_inputs)
    dead = zero_channels(_reference(gm), plan)
    at = list(at)
    want = _outputs(dead.eval(), xs, at)
    del dead  # one copy at a time: the zeroed one, then the pruned one
    pruned = apply_plan(gm, cg, plan, example_inputs)
    got = _outputs(pruned.eval(), xs, at)
    return max_scaled_diff(want, got), pruned, plan


def _outputs(model: nn.Module, xs: Any, at: list[str]) -> Any:
    """The model's outputs on `xs`, or those of the modules at paths `at`."""
    seen: dict[str, list] = {p: [] for p in at}
    handles = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen[p].append(o)) for p in at]
    try:
        with torch.inference_mode():
            out = xs.call(model)
    finally:
        for h in handles:
            h.remove()
    return [seen[p] for p in at] if at else out
