"""Rules for structural tensor ops: concat, split, indexing, reshapes, permutes, reductions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.graph.coupling import Builder, where
from fxslim.graph.rules.common import (
    _arg,
    _dim,
    _is_tensor,
    _keep_except,
    _shape,
    _spatial_ops,
    couple_unknown,
)

# ---------------------------------------------------------------------------------------
# structural tensor ops


def couple_cat(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """cat: inputs sit at offsets of the output's cat dim; other dims are shared."""
    tensors = _arg(node, 0, "tensors")
    d = _arg(node, 1, "dim", 0)
    shape = _shape(node)
    d = _dim(d, len(shape))
    out = b.fresh(shape, node.name, None)
    off = 0
    for t in tensors:
        ts, tsh = b.out[t], _shape(t)
        for i, s in enumerate(ts):
            if i == d:
                n = tsh[i]
                b.link(s, np.arange(n), out[d], off + np.arange(n))
                off += n
            else:
                b.union(out[i], s)
    b.out[node] = out


def couple_stack(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    tensors = _arg(node, 0, "tensors")
    d = _dim(_arg(node, 1, "dim", 0), len(_shape(node)))
    out = list(b.out[tensors[0]])
    for t in tensors[1:]:
        for i, s in enumerate(b.out[t]):
            b.union(out[i], s)
    out.insert(d, b.new(len(tensors), f"{node.name}:{d}", f"stacked dim of {where(node, b.gm)}"))
    b.out[node] = out


def couple_split(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """split/chunk: output i is the range [off_i, off_i + n_i) of the input's split dim."""
    x = node.args[0]
    d = _arg(node, 2, "dim", 0)
    xs = b.out[x]
    d = _dim(d, len(xs))
    outs, off = [], 0
    for sh in _shape(node):
        o = list(xs)
        o[d] = b.new(sh[d], f"{node.name}:{d}")
        b.link(xs[d], off + np.arange(sh[d]), o[d], np.arange(sh[d]))
        off += sh[d]
        outs.append(o)
    b.out[node] = outs


def literal_dims_split(b: Builder, node: fx.Node) -> list[int]:
    x = node.args[0]
    return [b.out[x][_dim(_arg(node, 2, "dim", 0), len(b.out[x]))]]


def fix_split(node: fx.Node, new_sizes: Callable, kept: Callable, dynamic: Callable) -> None:
    """Sections become explicit lists of the kept sizes (chunk turns into split)."""
    sizes = [new_sizes(node, i) for i in range(len(node.meta["tensor_meta"]))]
    old = [tuple(t.shape) for t in node.meta["tensor_meta"]]
    x = node.args[0]
    d = _arg(node, 2, "dim", 0)
    d = _dim(d, len(old[0]))
    secs = [s[d] for s in sizes]
    if secs == [o[d] for o in old]:
        return
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args = (x, secs, d)
    node.kwargs = {}


def couple_unbind(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    x = node.args[0]
    d = _dim(_arg(node, 1, "dim", 0), len(b.out[x]))
    xs = list(b.out[x])
    b.pin(xs[d], f"unbound by {where(node, b.gm)}")
    rest = xs[:d] + xs[d + 1 :]
    b.out[node] = [list(rest) for _ in _shape(node)]


def couple_getitem(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """getitem: picks a tuple element, or indexes a tensor with ints/slices/None/..."""
    x, idx = node.args
    xs = b.out.get(x)
    if xs is None:
        b.out[node] = None
        return
    if not _is_tensor(b, x):  # tuple/list of outputs
        b.out[node] = xs[idx]
        return
    shape = _shape(node)
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, fx.Node) for i in idx) or any(
        isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step)) for i in idx
    ):
        couple_unknown(b, node, None)
        return
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(xs) - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (len(xs) - sum(1 for i in expanded if i is not None))
    out, d, od = [], 0, 0
    for i in expanded:
        if i is None:
            out.append(b.new(1, f"{node.name}:{od}", "inserted size-1 dim"))
            od += 1
            continue
        if isinstance(i, int):
            b.pin(xs[d], f"indexed by a constant in {where(node, b.gm)}")
            d += 1
            continue
        n_in = _shape(x)[d]
        start, stop, step = i.indices(n_in)
        if (start, stop, step) == (0, n_in, 1):
            out.append(xs[d])
        elif step != 1:
            b.pin(xs[d], f"strided slice in {where(node, b.gm)}")
            out.append(b.new(shape[od], f"{node.name}:{od}", f"strided slice in {where(node, b.gm)}"))
        else:
            s = b.new(shape[od], f"{node.name}:{od}")
            b.link(xs[d], np.arange(start, stop), s, np.arange(stop - start))
            out.append(s)
        d += 1
        od += 1
    b.out[node] = out


def literal_dims_getitem(b: Builder, node: fx.Node) -> list[int]:
    x, idx = node.args
    if not _is_tensor(b, x):
        return []
    tup = idx if isinstance(idx, tuple) else (idx,)
    xs, out, d = b.out[x], [], 0
    n_real = sum(1 for i in tup if i is not None and i is not Ellipsis)
    for i in tup:
        if i is Ellipsis:
            d += len(xs) - n_real
        elif i is not None:
            if isinstance(i, slice) and (i.start, i.stop, i.step) != (None, None, None):
                out.append(xs[d])
            d += 1
    return out


def fix_getitem(node: fx.Node, new_sizes: Callable, kept: Callable, dynamic: Callable) -> None:
    """Slice bounds on pruned dims move to the kept positions."""
    x, idx = node.args
    if not isinstance(x, fx.Node) or not isinstance(x.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata):
        return
    tup = idx if isinstance(idx, tuple) else (idx,)
    in_shape = tuple(x.meta["tensor_meta"].shape)
    n_real = sum(1 for i in tup if i is not None and i is not Ellipsis)
    new, d = [], 0
    for i in tup:
        if i is Ellipsis:
            new.append(i)
            d += len(in_shape) - n_real
            continue
        if i is None:
            new.append(i)
            continue
        if isinstance(i, slice):
            mask = kept(x, d)
            start, stop, step = i.indices(in_shape[d])
            if mask is not None and (start, stop, step) != (0, in_shape[d], 1):
                i = slice(int(mask[:start].sum()), int(mask[:stop].sum()), None)
        new.append(i)
        d += 1
    node.args = (x, tuple(new) if isinstance(idx, tuple) else new[0])


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
    the outermost factor that carries channels; a split couples the outermost new
    factor. Any other factor that carries channels is pinned: one flat dim cannot
    follow two independent channel sets.
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
        elif len(gi) == 1:  # split
            src = xs[gi[0]]
            free = not b.is_pinned(src)
            for k, d in enumerate(gj):
                if free and k == 0:
                    s = b.new(out_shape[d], f"{node.name}:{d}")
                    inner = int(np.prod([out_shape[e] for e in gj[1:]]))
                    f = np.arange(a[gi[0]])
                    b.link(src, f, s, f // inner)
                else:
                    s = b.new(out_shape[d], f"{node.name}:{d}", f"split off by {loc}")
                if b.find(src) in dyn:
                    b.dynamic.add(s)
                out[d] = s
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
    if not shape and "shape" in node.kwargs:
        shape = list(node.kwargs["shape"])
        _literal_sizes(shape, old, new, dyn)
        node.kwargs = {**node.kwargs, "shape": tuple(shape)}
        return
    _literal_sizes(shape, old, new, dyn)
    node.args = (args[0], tuple(shape)) if packed else (args[0], *shape)


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


def _reduce(stat: bool):
    def couple(b: Builder, node: fx.Node, mod=None, path=None) -> None:
        """mean/sum/amax over dims: reduced dims disappear (or keep size 1)."""
        x = node.args[0]
        xs = b.out[x]
        dims = _arg(node, 1, "dim")
        keep = _arg(node, 2, "keepdim", False)
        if dims is None:
            dims = list(range(len(xs)))
        dims = {_dim(d, len(xs)) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        out = []
        for i, s in enumerate(xs):
            if i in dims:
                if stat:
                    b.mark_stat(s)
                if keep:
                    out.append(b.new(1, f"{node.name}:{i}", "reduced dim"))
            else:
                out.append(s)
        b.out[node] = out

    return couple


def couple_adaptive_pool(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    x = node.args[0]
    nd = len(_shape(node))
    if mod is not None:
        osz = mod.output_size
    else:
        osz = _arg(node, 1, "output_size")
    nsp = len(osz) if isinstance(osz, (tuple, list)) else {
        F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
        F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
    }.get(node.target, 2)
    if mod is not None:
        nsp = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1, nn.AdaptiveAvgPool3d: 3,
               nn.AdaptiveMaxPool3d: 3}.get(type(mod), 2)
    _keep_except(b, node, x, {d: 0 for d in range(nd - nsp, nd)}, f"spatial dim of {where(node, b.gm)}")
    if isinstance(b.out[node], list) and isinstance(mod, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)) and mod.return_indices:
        couple_unknown(b, node, mod)


def _pool(nsp: int):
    def couple(b: Builder, node: fx.Node, mod=None, path=None) -> None:
        if mod is not None and getattr(mod, "return_indices", False):
            couple_unknown(b, node, mod)
            return
        _spatial_ops(nsp)(b, node, mod, path)

    return couple


def couple_interpolate(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    x = node.args[0] if node.args else node.kwargs["input"]
    nd = len(_shape(node))
    _keep_except(b, node, x, {d: 0 for d in range(2, nd)}, f"spatial dim of {where(node, b.gm)}")


def couple_pad(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    x = node.args[0]
    xsh, shape = _shape(x), _shape(node)
    changed = {d: 0 for d in range(len(shape)) if shape[d] != xsh[d]}
    for d in changed:
        if d < 2:
            b.pin(b.out[x][d], f"padded by {where(node, b.gm)}")
    _keep_except(b, node, x, changed, f"padded dim of {where(node, b.gm)}")


def couple_pixel_shuffle(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """pixel_shuffle(r): output channel c is input channels c*r^2 .. c*r^2 + r^2 - 1."""
    r = mod.upscale_factor if mod is not None else _arg(node, 1, "upscale_factor")
    _pixel_rearrange(b, node, r, shuffle=True)


def couple_pixel_unshuffle(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """pixel_unshuffle(r): output channels c*r^2 .. c*r^2 + r^2 - 1 come from input channel c."""
    r = mod.downscale_factor if mod is not None else _arg(node, 1, "downscale_factor")
    _pixel_rearrange(b, node, r, shuffle=False)


def _pixel_rearrange(b: Builder, node: fx.Node, r: int, shuffle: bool) -> None:
    """Channels <-> r x r pixel blocks: each block of r^2 wide-side channels is one narrow-side channel."""
    x = node.args[0]
    xs, shape = b.out[x], _shape(node)
    cd = len(shape) - 3
    c = b.new(shape[cd], f"{node.name}:{cd}")
    if shuffle:  # the input is the wide side
        f = np.arange(_shape(x)[cd])
        b.link(xs[cd], f, c, f // (r * r))
    else:
        f = np.arange(shape[cd])
        b.link(xs[cd], f // (r * r), c, f)
    loc = f"spatial dim of {where(node, b.gm)}"
    b.out[node] = list(xs[:cd]) + [c] + [b.new(shape[d], f"{node.name}:{d}", loc) for d in (cd + 1, cd + 2)]


def couple_channel_shuffle(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """channel_shuffle(g): out[j*g + i] = in[i*cpg + j]; index j goes from every group at once."""
    x = node.args[0]
    xs = b.out[x]
    g = mod.groups if mod is not None else _arg(node, 1, "groups")
    c = _shape(x)[1]
    cpg = c // g
    oc = b.new(c, f"{node.name}:1")
    i, j = np.meshgrid(np.arange(g), np.arange(cpg), indexing="ij")
    i, j = i.ravel(), j.ravel()
    b.link(xs[1], i * cpg + j, oc, j * g + i)
    b.link(xs[1], i * cpg + j, xs[1], j)  # the same j in every group is one unit
    b.out[node] = [xs[0], oc] + list(xs[2:])


def couple_matmul(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """matmul: a(..., n, k) @ b(..., k, m): k is contracted (coupled), batch dims broadcast."""
    x, y = node.args[0], node.args[1]
    xs, ys = b.out[x], b.out[y]
    if len(xs) < 2 or len(ys) < 2:
        couple_unknown(b, node, None)
        return
    b.union(xs[-1], ys[-2])
    shape = _shape(node)
    out = b.fresh(shape[:-2], node.name, f"broadcast dims of {where(node, b.gm)}") + [xs[-2], ys[-1]]
    for t, ts in ((x, xs), (y, ys)):
        tsh = _shape(t)
        off = len(shape) - len(tsh)
        for d in range(len(tsh) - 2):
            if tsh[d] == shape[d + off] and tsh[d] != 1:
                b.union(out[d + off], ts[d])
    b.out[node] = out


def couple_einsum(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """einsum: every letter is one index set across operands and output."""
    eq = node.args[0]
    ops = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], fx.Node) else node.args[1]
    if "..." in eq or "->" not in eq or not all(isinstance(o, fx.Node) for o in ops):
        couple_unknown(b, node, None)
        return
    lhs, rhs = eq.replace(" ", "").split("->")
    letter: dict[str, int] = {}
    for spec, op in zip(lhs.split(","), ops):
        for ch, s in zip(spec, b.out[op]):
            if ch in letter:
                if b.sizes[b.find(letter[ch])] == b.sizes[b.find(s)]:
                    b.union(letter[ch], s)
                else:
                    b.pin(s, f"broadcast in {where(node, b.gm)}")
            else:
                letter[ch] = s
    b.out[node] = [letter[ch] for ch in rhs]


def couple_sdpa(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """scaled_dot_product_attention: q·k over E (scale depends on E: a statistic), out takes v's E."""
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    qs, ks, vs = b.out[q], b.out[k], b.out[v]
    b.union(qs[-1], ks[-1])
    b.mark_stat(qs[-1])
    b.union(ks[-2], vs[-2])
    b.mark_stat(ks[-2])
    for d in range(len(qs) - 2):
        for t in (ks, vs):
            if b.sizes[b.find(t[d])] == b.sizes[b.find(qs[d])]:
                b.union(qs[d], t[d])
    b.out[node] = list(qs[:-1]) + [vs[-1]]


def couple_linear_fn(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """F.linear(x, w, bias) with w a graph tensor: x's last dim is w's dim 1."""
    x, w = node.args[0], _arg(node, 1, "weight")
    bias = _arg(node, 2, "bias")
    b.union(b.out[x][-1], b.out[w][1])
    if isinstance(bias, fx.Node):
        b.union(b.out[w][0], b.out[bias][0])
    b.out[node] = list(b.out[x][:-1]) + [b.out[w][0]]


def couple_layer_norm_fn(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """F.layer_norm(x, normalized_shape, w, b): a statistic over the last dim; w, b on it."""
    x = node.args[0]
    ns = _arg(node, 1, "normalized_shape")
    xs = b.out[x]
    b.out[node] = list(xs)
    if len(ns) != 1:
        for s in xs[-len(ns):]:
            b.pin(s, f"{where(node, b.gm)} normalises over several dims")
        return
    b.mark_stat(xs[-1])
    for i, name in ((2, "weight"), (3, "bias")):
        t = _arg(node, i, name)
        if isinstance(t, fx.Node):
            b.union(xs[-1], b.out[t][0])


def literal_dims_layer_norm(b: Builder, node: fx.Node) -> list[int]:
    return [b.out[node.args[0]][-1]]


def fix_layer_norm_fn(node: fx.Node, new_sizes: Callable, kept: Callable, dynamic: Callable) -> None:
    x = node.args[0]
    n = new_sizes(x, None)[-1]
    args = list(node.args)
    if len(args) > 1:
        args[1] = (n,)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": (n,)}
