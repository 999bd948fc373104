"""Shared pieces of the graph-rewriting passes (fold, fuse, drop identities, low-rank).

Each of those passes works on a copy of the module tree (`copy_structure`: the user's
module is left as it was), edits the graph, re-runs shape propagation from the
placeholders' recorded shapes, and appends one step to ``gm.meta["fxslim_history"]``
so `fxslim.load` replays it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxslim._args import check_module
from fxslim.errors import PassContractError, TraceError
from fxslim.graph.shapes import propagate_shapes
from fxslim.graph.trace import compile_now, copy_structure, trace

__all__ = ["as_graph", "finish", "module_of", "only_user", "set_module", "start"]


def as_graph(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """`model` itself when it is a GraphModule, else its `fxslim.trace` (inputs needed)."""
    check_module("model", model)
    if isinstance(model, fx.GraphModule):
        return model
    if example_inputs is None:
        raise PassContractError(
            f"{type(model).__name__} is not a GraphModule: pass example_inputs to trace it"
        )
    return trace(model.eval(), example_inputs)


def start(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy to rewrite: new module objects and graph, tensors shared until replaced."""
    return copy_structure(gm)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls (None for other nodes)."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def only_user(node: fx.Node) -> fx.Node | None:
    """The single node that reads `node`, or None when zero or several do."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put `module` at dotted path `target` of the (copied) tree."""
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def parameter(t: torch.Tensor, like: torch.Tensor | None = None) -> nn.Parameter:
    """A new parameter holding `t` (requires_grad like `like`, default True)."""
    return nn.Parameter(
        t.detach().contiguous(), requires_grad=True if like is None else like.requires_grad
    )


def finish(gm: fx.GraphModule, step: dict[str, Any] | None) -> fx.GraphModule:
    """Clean up the edited copy, recompile, re-propagate shapes and record `step`."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    compile_now(gm)
    inputs = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        tm = n.meta.get("tensor_meta")
        inputs.append(
            torch.zeros(tuple(tm.shape), dtype=tm.dtype)
            if tm is not None and hasattr(tm, "shape")
            else (n.args[0] if n.args else None)
        )
    try:
        propagate_shapes(gm, inputs)
    except TraceError as exc:
        raise PassContractError(f"pass author: the rewritten graph no longer runs: {exc}") from exc
    if step is not None:
        gm.meta["fxslim_history"] = list(gm.meta.get("fxslim_history", [])) + [step]
    return gm
