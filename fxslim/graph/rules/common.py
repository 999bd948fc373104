"""Helpers shared by the rules, and the rules for graph inputs, attributes and outputs."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from fxslim.graph.coupling import Builder, where
from fxslim.graph.shapes import node_shapes

# ---------------------------------------------------------------------------------------
# helpers


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _shape(node: Any) -> Any:
    return node_shapes(node) if isinstance(node, fx.Node) else None


def _is_tensor(b: Builder, x: Any) -> bool:
    return isinstance(x, fx.Node) and isinstance(b.out.get(x), list) and (
        not b.out[x] or isinstance(b.out[x][0], int)
    )


def broadcast_into(b: Builder, out: list[int], out_shape: tuple, x: fx.Node) -> None:
    """Union `x`'s dims with the output dims they are aligned with (numpy broadcasting)."""
    xs, xsh = b.out[x], _shape(x)
    off = len(out_shape) - len(xsh)
    for d, s in enumerate(xs):
        if xsh[d] == out_shape[d + off] and xsh[d] != 1:
            b.union(out[d + off], s)


def elementwise(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """Output dims are the input dims (after broadcasting): x+y, relu(x), x*s ..."""
    shape = _shape(node)
    tensors = [a for a in _flat_args(node) if _is_tensor(b, a)]
    if not isinstance(shape, tuple) or any(len(_shape(t)) > len(shape) for t in tensors):
        # another form of the op (torch.where(cond) gives indices): not elementwise
        couple_unknown(b, node, mod, f"{where(node, b.gm)} in a form that is not elementwise")
        return
    out = None
    for t in tensors:  # reuse the spaces of an input that has the output's full shape
        if _shape(t) == shape:
            out = list(b.out[t])
            break
    if out is None:
        out = b.fresh(shape, node.name, f"broadcast dims of {where(node, b.gm)}")
    for t in tensors:
        broadcast_into(b, out, shape, t)
    b.out[node] = out


def same_as_input(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """Output is the first input, channel for channel (dropout, identity, contiguous)."""
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    if b.out.get(x) is None or _shape(x) != _shape(node):
        couple_unknown(b, node, mod, f"{where(node, b.gm)} in a form that does not keep its input's shape")
        return
    b.out[node] = list(b.out[x])


def _flat_args(node: fx.Node) -> list:
    out: list = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def _keep_except(b: Builder, node: fx.Node, x: fx.Node, new_dims: dict[int, int], pin: str | None) -> None:
    """Output = input with the listed dims replaced by fresh spaces (sizes from meta).

    With a `pin` reason the op mixes positions along those dims (pooling, resizing,
    padding, rolling): the input's dims are pinned as well, since removing one input
    position changes its neighbours' outputs (SAM2-Hiera resizes a parameter, its
    position-embedding grid, with a bicubic interpolate)."""
    shape = _shape(node)
    out = list(b.out[x])
    for d in new_dims:
        if pin is not None:
            b.pin(out[d], pin)
        out[d] = b.new(shape[d], f"{node.name}:{d}", pin)
        b.dynamic.add(out[d])
    b.out[node] = out


def _spatial_ops(nsp: int):
    """Pooling/upsampling/padding: the last `nsp` dims change, the others pass through."""

    def couple(b: Builder, node: fx.Node, mod=None, path=None) -> None:
        x = node.args[0]
        nd = len(_shape(node))
        dims = {d: 0 for d in range(nd - nsp, nd)}
        _keep_except(b, node, x, dims, f"spatial dim of {where(node, b.gm)}")

    return couple


# ---------------------------------------------------------------------------------------
# placeholders, parameters, outputs


def couple_placeholder(b: Builder, node: fx.Node) -> None:
    shape = _shape(node)
    if shape is None:
        b.out[node] = None
        return
    b.out[node] = _fresh_struct(b, shape, node.name, f"model input '{node.target}'", dynamic=True)


def _fresh_struct(b: Builder, shape: Any, label: str, pin: str, dynamic: bool = False) -> Any:
    if shape is None:
        return None
    if isinstance(shape, tuple):
        return b.fresh(shape, label, pin, dynamic)
    return [_fresh_struct(b, s, f"{label}.{i}", pin, dynamic) for i, s in enumerate(shape)]


def couple_get_attr(b: Builder, node: fx.Node) -> None:
    """A parameter or buffer used directly in the graph (class token, layer scale ...)."""
    shape = _shape(node)
    if shape is None or not isinstance(shape, tuple):
        b.out[node] = None
        return
    t = _fetch_attr(b.gm, node.target)
    kind = "param" if isinstance(t, nn.Parameter) else "buffer"
    out = []
    for d, s in enumerate(shape):
        key = (node.target, d)
        if key in b.member_space:  # the same tensor fetched twice: same spaces
            out.append(b.member_space[key])
            continue
        sid = b.new(s, f"{node.target}:{d}")
        if s == 1:
            b.pin(sid, f"size-1 dim of '{node.target}'")
        else:
            b.attr_dim(sid, kind, node.target, d)
        out.append(sid)
    b.out[node] = out


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def couple_output(b: Builder, node: fx.Node) -> None:
    for a in _flat_args(node):
        s = b.out.get(a)
        if s is not None:
            b.pin_struct(s, "model output")


def couple_unknown(b: Builder, node: fx.Node, mod: nn.Module | None, reason: str | None = None) -> None:
    """No rule, a module kept whole for `reason`, or a rule the op's operands defeat: pin
    everything the op touches; its
    outputs are new pinned spaces."""
    reason = reason or f"no rule for {where(node, b.gm)}"
    for a in _flat_args(node):
        s = b.out.get(a)
        if s is not None:
            b.pin_struct(s, reason)
    if mod is not None:  # parameters inside an unknown module are pinned as well
        for name, p in mod.named_parameters():
            for d, s in enumerate(p.shape):
                sid = b.new(s, f"{node.target}.{name}:{d}", reason)
                b.member(sid, "param", f"{node.target}.{name}", d)
    b.out[node] = _fresh_struct(b, _shape(node), node.name, reason)
