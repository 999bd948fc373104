"""Rules for view ops: reshape/view/flatten (strided maps), permutes, squeezes, expand."""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch
from torch import fx

from fxslim.graph.coupling import Builder, where
from fxslim.graph.rules.common import (
    _arg,
    _dim,
    _shape,
)


def _view_groups(a: tuple, bshape: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair dims of `a` and `bshape` whose products match, left to right.

    A size-1 dim facing a size-1 dim is paired with it (the batch dim of a batch of one);
    other size-1 dims are dropped (input) or new (output).
    """
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(bshape):
        if i < len(a) and j < len(bshape) and a[i] == 1 and bshape[j] == 1:
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        if i < len(a) and a[i] == 1:
            i += 1
            continue
        if j < len(bshape) and bshape[j] == 1:
            j += 1
            continue
        if i >= len(a) or j >= len(bshape):
            return None
        gi, gj = [i], [j]
        pa, pb = a[i], bshape[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    return None
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                if j >= len(bshape):
                    return None
                gj.append(j)
                pb *= bshape[j]
                j += 1
        groups.append((gi, gj))
    return groups


def couple_reshape(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """view/reshape/flatten/unflatten.

    Dims that keep their size are the same space. A merge (C, H, W) -> C*H*W couples
    the merged dim to one factor by stride (element f belongs to channel f // (H*W)),
    the outermost factor that carries channels. A split couples one new factor: the
    outermost that nothing else pins by the end of the analysis (a fused qkv output split
    into (3, heads, head_dim) and unbound along the 3 is coupled by whole heads). Any
    other factor is pinned: one flat dim cannot follow two independent channel sets.
    """
    x = node.args[0] if node.args else node.kwargs["input"]
    xs, a = b.out[x], _shape(x)
    out_shape = _shape(node)
    loc = where(node, b.gm)
    out: list[int | None] = [None] * len(out_shape)
    dyn = {b.find(s) for s in b.dynamic}
    groups = _view_groups(a, out_shape)
    if groups is None:
        b.pin_struct(xs, f"reshape not understood at {loc}")
        b.out[node] = b.fresh(out_shape, node.name, f"reshape at {loc}")
        return
    for gi, gj in groups:
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = xs[gi[0]]
        elif len(gj) == 1:  # merge
            flat = b.new(out_shape[gj[0]], f"{node.name}:{gj[0]}")
            free = [d for d in gi if not b.is_pinned(xs[d])]
            if free:
                p = free[0]
                inner = int(np.prod([a[d] for d in gi if d > p])) if p != gi[-1] else 1
                f = np.arange(out_shape[gj[0]])
                b.link(xs[p], (f // inner) % a[p], flat, f)
                for d in free[1:]:
                    b.pin(xs[d], f"merged with another channel dim by {loc}")
            else:
                b.pin(flat, f"merge of pinned dims at {loc}")
            if any(b.find(xs[d]) in dyn for d in gi):
                b.dynamic.add(flat)
            out[gj[0]] = flat
        elif len(gi) == 1:  # split: which factor carries the channels is decided at the end
            src = xs[gi[0]]
            factors = [b.new(out_shape[d], f"{node.name}:{d}") for d in gj]
            for d, s in zip(gj, factors):
                if b.find(src) in dyn:
                    b.dynamic.add(s)
                out[d] = s
            if b.is_pinned(src):
                for s in factors:
                    b.pin(s, f"split off by {loc}")
            else:
                b.defer_split(src, factors, f"split off by {loc}")
        else:
            for d in gi:
                b.pin(xs[d], f"reshape mixes dims at {loc}")
            for d in gj:
                out[d] = b.new(out_shape[d], f"{node.name}:{d}", f"reshape mixes dims at {loc}")
                b.dynamic.add(out[d])
    for d, s in enumerate(out):
        if s is None:
            out[d] = b.new(out_shape[d], f"{node.name}:{d}", f"size-1 dim from {loc}")
    b.out[node] = out


def literal_dims_shape(b: Builder, node: fx.Node) -> list[int]:
    """Output spaces whose size is written in the graph (an int other than -1, or a value)."""
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    if not args and "shape" in node.kwargs:
        args = list(node.kwargs["shape"])
    out = b.out.get(node) or []
    return [s for s, a in zip(out, args) if not (isinstance(a, int) and a == -1)]


def fix_shape_args(node: fx.Node, new_sizes: Callable, kept: Callable, dynamic: Callable) -> None:
    """view/reshape/expand: sizes of channel dims become literals of the new size.

    Sizes computed in the graph from channel counts (``c // groups``) would be stale,
    so every non-dynamic dim gets a literal; batch and spatial dims stay symbolic.
    """
    old = tuple(node.meta["tensor_meta"].shape)
    new = new_sizes(node, None)
    dyn = dynamic(node)
    args = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], (tuple, list))
    if node.op == "call_function" and node.target in (torch.reshape,):
        packed = True
    shape = list(args[1]) if packed else args[1:]
    made = []
    if not packed and len(shape) == 1 and isinstance(shape[0], fx.Node) and len(old) != 1:
        # one size object for the whole shape (EVA's t.reshape(x.shape)): its items, so
        # that each dim can become a literal or stay symbolic
        with node.graph.inserting_before(node):
            made = [node.graph.call_function(operator.getitem, (shape[0], d)) for d in range(len(old))]
        shape, packed = list(made), True
    if not shape and "shape" in node.kwargs:
        shape = list(node.kwargs["shape"])
        _literal_sizes(shape, old, new, dyn)
        node.kwargs = {**node.kwargs, "shape": tuple(shape)}
        return
    _literal_sizes(shape, old, new, dyn)
    node.args = (args[0], tuple(shape)) if packed else (args[0], *shape)
    for m in made:
        if not m.users:
            node.graph.erase_node(m)


def _literal_sizes(shape: list, old: tuple, new: tuple, dyn: list[bool]) -> None:
    for d, (o, n) in enumerate(zip(old, new)):
        if isinstance(shape[d], int) and shape[d] == -1:
            continue
        if o != n or (isinstance(shape[d], fx.Node) and not dyn[d]):
            shape[d] = n


def couple_permute(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    x = node.args[0]
    xs = b.out[x]
    if mod is not None:  # torchvision.ops.Permute-like modules are traced through
        dims = mod.dims
    else:
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(_arg(node, 1, "dims"), (tuple, list)) else node.args[1]
        if "dims" in node.kwargs:
            dims = node.kwargs["dims"]
    b.out[node] = [xs[_dim(d, len(xs))] for d in dims]


def couple_transpose(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    x = node.args[0]
    xs = list(b.out[x])
    d0 = _dim(_arg(node, 1, "dim0"), len(xs))
    d1 = _dim(_arg(node, 2, "dim1"), len(xs))
    xs[d0], xs[d1] = xs[d1], xs[d0]
    b.out[node] = xs


def couple_t(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    b.out[node] = list(reversed(b.out[node.args[0]]))


def couple_unsqueeze(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    x = node.args[0]
    xs = list(b.out[x])
    d = _dim(_arg(node, 1, "dim"), len(xs) + 1)
    xs.insert(d, b.new(1, f"{node.name}:{d}", "inserted size-1 dim"))
    b.out[node] = xs


def couple_squeeze(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    x = node.args[0]
    xs, xsh = b.out[x], _shape(x)
    out_shape = _shape(node)
    if len(out_shape) == len(xsh):
        b.out[node] = list(xs)
        return
    d = _arg(node, 1, "dim")
    if d is None:
        b.out[node] = [s for s, n in zip(xs, xsh) if n != 1]
    else:
        ds = {_dim(k, len(xs)) for k in (d if isinstance(d, (tuple, list)) else (d,))}
        b.out[node] = [s for i, (s, n) in enumerate(zip(xs, xsh)) if not (i in ds and n == 1)]


def couple_expand(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """expand: existing dims keep their spaces unless a size-1 dim is broadcast."""
    x = node.args[0]
    xs, xsh = b.out[x], _shape(x)
    shape = _shape(node)
    off = len(shape) - len(xsh)
    loc = where(node, b.gm)
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    out = []
    for d in range(len(shape)):
        symbolic = d < len(sizes) and isinstance(sizes[d], fx.Node)
        if d >= off and xsh[d - off] == shape[d] and not (shape[d] == 1 and symbolic):
            out.append(xs[d - off])
            continue
        s = b.new(shape[d], f"{node.name}:{d}", f"expanded dim at {loc}")
        if symbolic:  # e.g. the batch size
            b.dynamic.add(s)
        out.append(s)
    b.out[node] = out
