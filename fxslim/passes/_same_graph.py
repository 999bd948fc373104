"""The class-keeping rewrite's cheap proof: the class-kept model traces to the pruned graph.

`keep_classes` must show that the user's classes, given the pruned tensors and synced
size attributes, compute what the oracle-proven pruned GraphModule computes. Running both
on two inputs (`keep_classes._prove`) costs four forwards. When the pruned graph came from
torch.fx symbolic tracing there is a cheaper proof of the same thing: trace the class-kept
model again with the same tracer and options and compare graphs. If every node matches -
same op, same target, same arguments (literals equal, node references in the same
places), the same tensor under every parameter name the graph reads, and every leaf
module of the same class with equal attributes and the same tensors - then the two run
the same computation on every input the trace covers, which is the guarantee symbolic
tracing gave the pruned graph in the first place. A size that the user's forward reads
from an attribute shows up as a literal, so a forward that would compute with a stale or
changed size fails the comparison. Any mismatch, or anything this check does not
understand (hooks on a leaf, a non-fx capture, custom trace options), sends the caller
back to the numerical proof: this check only ever shortens a proof, never replaces a
failed one.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

__all__ = ["graph_mismatch"]

# a leaf module's own tables: its tensors are compared by identity/value, hooks must be empty
_TABLES = ("_parameters", "_buffers", "_modules")


def graph_mismatch(kept: nn.Module, pruned: fx.GraphModule, trace_options: Mapping[str, Any] | None) -> str | None:
    """None when `kept` traces to `pruned`'s graph with the same tensors; else the first difference.

    Args:
        kept: the class-kept model (`rebuild_classes`' result).
        pruned: the pruned GraphModule it was built from.
        trace_options: the `fxslim.trace` options the pruned graph was traced with; None
            when unknown (then the check does not apply).
    """
    from fxslim.graph.trace import symbolic_graph

    if trace_options is None or any(v for k, v in trace_options.items() if k != "capture"):
        return "traced with custom options"
    if pruned.meta.get("fxslim_capture", {}).get("kind") != "fx":
        return "not a torch.fx capture"
    try:
        root, graph, _ = symbolic_graph(kept, shallow=True)
    except Exception as exc:  # noqa: BLE001 - the class-kept copy does not trace: the numerical proof decides
        return f"the class-kept model does not trace ({type(exc).__name__})"
    mine = list(pruned.graph.nodes)
    theirs = list(graph.nodes)
    if len(mine) != len(theirs):
        return f"{len(theirs)} nodes, the pruned graph has {len(mine)}"
    env: dict[fx.Node, fx.Node] = {}
    mods_a, mods_b = dict(pruned.named_modules()), dict(root.named_modules())
    for a, b in zip(mine, theirs):
        if a.op != b.op or a.target != b.target:
            return f"node {a.name}: {b.op} {b.target} where the pruned graph has {a.op} {a.target}"
        if not (_same(a.args, b.args, env) and _same(a.kwargs, b.kwargs, env)):
            return f"node {a.name}: arguments differ ({b.args} vs {a.args})"
        if a.op == "get_attr" and not _same_attr(_fetch(pruned, a.target), _fetch(root, b.target)):
            return f"'{a.target}' differs"
        if a.op == "call_module" and not _same_module(mods_a[a.target], mods_b[b.target]):
            return f"leaf module '{a.target}' differs"
        env[a] = b
        env[b] = a  # both ways: a literal in the pruned graph may stand for a node of the copy
    return None


def _fetch(root: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _same(a: Any, b: Any, env: dict[fx.Node, fx.Node]) -> bool:
    if isinstance(b, fx.Node) and type(a) is int:
        # the rewrite writes a static size read (``N`` of ``B, N, C = x.shape``) as the literal it
        # had on the example; the class-kept copy still reads it: equal where the shapes are the example's
        mine = env.get(b)
        return mine is not None and _static_int(mine) == a
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and env.get(a) is b
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y, env) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], env) for k in a)
    if isinstance(a, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step), env)
    return _equal(a, b)


def _static_int(node: fx.Node) -> int | None:
    """The value of ``x.shape[i]`` / ``x.size(i)`` from the recorded shapes, else None."""
    from fxslim.graph.shapes import node_shapes

    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 \
            and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int):
        shape, i = node_shapes(node.args[0]), node.args[1]
    elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int) \
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_function" \
            and node.args[0].target is getattr and node.args[0].args[1] == "shape":
        shape, i = node_shapes(node.args[0].args[0]), node.args[1]
    else:
        return None
    return shape[i] if isinstance(shape, tuple) and -len(shape) <= i < len(shape) else None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return _same_tensor(a, b)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a plain equality: not provably the same
        return False


def _same_tensor(a: torch.Tensor, b: Any) -> bool:
    return isinstance(b, torch.Tensor) and (a is b or (
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)))


def _same_attr(a: Any, b: Any) -> bool:
    if isinstance(a, nn.Module):
        return isinstance(b, nn.Module) and _same_module(a, b)
    return _same_tensor(a, b) if isinstance(a, torch.Tensor) else _equal(a, b)


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """Same class, equal plain attributes, the same tensors, no hooks, recursively."""
    if type(a) is not type(b):
        return False
    va, vb = vars(a), vars(b)
    if va.keys() != vb.keys():
        return False
    for key, x in va.items():
        if key in _TABLES:
            continue
        if "hook" in key:  # hooks run on call: the graph does not show them, so none may be there
            if x or vb[key]:
                return False
            continue
        if not _same_attr(x, vb[key]):
            return False
    for table in ("_parameters", "_buffers"):
        ta, tb = va[table], vb[table]
        if ta.keys() != tb.keys() or not all(
                (ta[k] is None and tb[k] is None) or (ta[k] is not None and _same_tensor(ta[k], tb[k])) for k in ta):
            return False
    ma, mb = va["_modules"], vb["_modules"]
    return ma.keys() == mb.keys() and all(
        (ma[k] is None and mb[k] is None) or (ma[k] is not None and mb[k] is not None and _same_module(ma[k], mb[k]))
        for k in ma)
