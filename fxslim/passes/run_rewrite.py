"""The rewrite for a run capture: slice the user's own module tree.

A run capture (`fxslim.graph.run_capture`) records one eager forward for the analysis;
its graph is never replayed, so there is no GraphModule to rewrite. The plan is applied
to a copy of the module tree that was run (the user's classes, tensors by their own
qualified names): every member tensor is sliced by the plan's kept indices, every other
tensor copied, and each changed module's size attributes are brought in line by its
rule's ``sync`` and `fxslim.passes.keep_classes.CLASS_SYNCS` (``out_channels``,
``num_features``, ``in_features`` ...). Sizes the user's forward computes from tensors
(``x.shape[1]``) follow by themselves.

The result is checked by running it on the example inputs (a size the forward reads
from an attribute no sync knows fails here, with the module named); the oracles
(`fxslim.passes.verify`: slicing consistency, dead-channel equivalence) run the user's
classes on both sides.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn

from fxslim._inputs import as_inputs
from fxslim.errors import PassContractError, TraceError
from fxslim.graph import rules as R
from fxslim.graph.coupling import CouplingGraph
from fxslim.graph.run_capture import RUN_MODEL, UNUSED
from fxslim.graph.trace import _user_frame, copy_structure
from fxslim.passes.keep_classes import _class_sync, _failing_module
from fxslim.passes.prune import PrunePlan, _compose_keep, plan_record, slice_tensors
from fxslim.utils import META_ATTR

__all__ = ["apply_plan_to_classes", "run_model"]

logger = logging.getLogger(__name__)


def run_model(gm: fx.GraphModule) -> nn.Module:
    """The module tree a run capture ran (its tensors are the analysed ones)."""
    return gm.meta[RUN_MODEL]


def apply_plan_to_classes(
    gm: fx.GraphModule, cg: CouplingGraph, plan: PrunePlan, example_inputs: Any
) -> nn.Module:
    """`plan` applied to a copy of the run capture's module tree (see the module docstring).

    Raises:
        TraceError: the run never read some parameters (their couplings are unknown).
        PassContractError: the sliced model does not run on the example inputs.
    """
    root = run_model(gm)
    unused = gm.meta.get(UNUSED, [])
    if unused and plan.keep:
        raise TraceError(
            f"the recorded run of {type(root).__name__} never read {len(unused)} parameters ({unused[:3]}"
            f"{' ...' if len(unused) > 3 else ''}: a branch the example inputs did not take, or another "
            "mode): their channels are coupled to nothing fxslim saw, so a prune could leave them the wrong "
            "size. Give example inputs whose run reads every parameter."
        )
    new = copy_structure(root)
    slice_tensors(new, plan, lambda mod: [R.sync_of(mod), _class_sync(mod)])
    record = {k: v for k, v in gm.meta.items() if k in ("fxslim_source", "fxslim_inputs")}
    record["fxslim_history"] = list(gm.meta.get("fxslim_history", [])) + [plan_record(cg, plan)]
    record["fxslim_keep"] = _compose_keep(gm.meta.get("fxslim_keep", {}), plan.keep)
    setattr(new, META_ATTR, record)
    training = [m for m in new.modules() if m.training]
    new.eval()
    try:
        with torch.no_grad():
            as_inputs(example_inputs).call(new)
    except Exception as exc:
        raise PassContractError(
            f"the pruned {type(root).__name__} (its own classes, sliced) fails on the example inputs"
            f"{_failing_module(exc, new)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            f"  at {_user_frame(exc)}\n  (a size its forward reads from an attribute fxslim does not update: "
            "keep that layer whole with ignore=[...], or add its class to CLASS_SYNCS)"
        ) from exc
    finally:
        for m in training:
            m.training = True
    logger.info(
        "pruned %s in its own classes: %d tensors sliced", type(root).__name__, len(plan.keep)
    )
    return new
