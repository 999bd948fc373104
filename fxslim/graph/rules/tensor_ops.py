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
    broadcast_into,
    couple_unknown,
)
from fxslim.graph.rules.operands import layer_operands

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
    """getitem: picks a tuple element, or indexes a tensor with ints/slices/None/..., or
    gathers rows with an integer index tensor (a relative-position bias table indexed by
    its position index: the gathered dim stays whole, the dims after it pass through)."""
    x, idx = node.args
    xs = b.out.get(x)
    if xs is None:
        b.out[node] = None
        return
    if not _is_tensor(b, x):  # tuple/list of outputs
        b.out[node] = xs[idx]
        return
    shape = _shape(node)
    if isinstance(idx, fx.Node) and _is_int_tensor(idx):  # x[index]: a gather along dim 0
        loc = f"gathered by an index tensor in {where(node, b.gm)}"
        b.pin(xs[0], loc)
        if x.op == "get_attr":  # a table's rows are positions, not channels
            b.not_channels(x.target, 0, loc)
        b.pin_struct(b.out.get(idx), loc)
        n_idx = len(shape) - len(xs) + 1
        b.out[node] = [b.new(shape[d], f"{node.name}:{d}", loc) for d in range(n_idx)] + list(xs[1:])
        return
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, fx.Node) for i in idx):  # a computed index or a mask
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
    if sum(isinstance(i, (list, tuple)) for i in expanded) > 1:  # advanced indices broadcast together
        couple_unknown(b, node, None, f"{where(node, b.gm)} with several index lists")
        return
    out, d, od = [], 0, 0
    for i in expanded:
        if isinstance(i, (list, tuple)):  # x[:, :, [0, 1, 8, ...]]: positions picked (CSATv2's zigzag)
            loc = f"indexed by a constant list in {where(node, b.gm)}"
            b.pin(xs[d], loc)
            out.append(b.new(shape[od], f"{node.name}:{od}", loc))
            d += 1
            od += 1
            continue
        if i is None:
            out.append(b.new(1, f"{node.name}:{od}", "inserted size-1 dim"))
            od += 1
            continue
        if isinstance(i, int):
            b.pin(xs[d], f"indexed by a constant in {where(node, b.gm)}")
            d += 1
            continue
        if _computed_bounds(i):  # x[:, :H] with H from a shape: that dim stays whole
            loc = f"sliced by a computed bound in {where(node, b.gm)}"
            b.pin(xs[d], loc)
            out.append(b.new(shape[od], f"{node.name}:{od}", loc))
            b.dynamic.add(out[-1])
            d += 1
            od += 1
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


def _is_int_tensor(n: fx.Node) -> bool:
    tm = n.meta.get("tensor_meta")
    return isinstance(tm, torch.fx.passes.shape_prop.TensorMetadata) and not tm.dtype.is_floating_point \
        and not tm.dtype.is_complex and tm.dtype != torch.bool


def _computed_bounds(i) -> bool:
    return isinstance(i, slice) and any(isinstance(v, fx.Node) for v in (i.start, i.stop, i.step))


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
            if isinstance(i, slice) and (i.start, i.stop, i.step) != (None, None, None) and not _computed_bounds(i):
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
        if isinstance(i, slice) and not _computed_bounds(i):  # computed bounds: on a pinned dim
            mask = kept(x, d)
            start, stop, step = i.indices(in_shape[d])
            if mask is not None and (start, stop, step) != (0, in_shape[d], 1):
                i = slice(int(mask[:start].sum()), int(mask[:stop].sum()), None)
        new.append(i)
        d += 1
    node.args = (x, tuple(new) if isinstance(idx, tuple) else new[0])


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


_ADAPTIVE_NSP = {
    F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool3d: 3,
}


def couple_adaptive_pool(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """Adaptive pools (module or function): channels pass through, the pooled dims are new."""
    key = node.target if mod is None else next(t for t in type(mod).__mro__ if t in _ADAPTIVE_NSP)
    _pool(_ADAPTIVE_NSP[key])(b, node, mod, path)


def _pool(nsp: int):
    def couple(b: Builder, node: fx.Node, mod=None, path=None) -> None:
        """Pooling/padding (module or function): channels pass through, the last `nsp` dims
        are new; with return_indices the indices are flat positions per channel: pinned."""
        op = layer_operands(b, node, mod, path, (), ("return_indices",))
        if op is None:
            return
        if op.settings["return_indices"]:
            couple_unknown(b, node, mod, f"{where(node, b.gm)} returns indices")
            return
        _spatial_ops(nsp)(b, node, mod, path)

    return couple


def couple_roll(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """roll(x, shifts, dims): a cyclic shift along `dims` (kept whole: the shift counts
    positions); the other dims pass through. Without dims it rolls the flattened tensor."""
    x = node.args[0]
    xs = b.out[x]
    dims = _arg(node, 2, "dims")
    loc = f"rolled by {where(node, b.gm)}"
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        dims = range(len(xs))
    dims = {_dim(d, len(xs)) for d in (dims if isinstance(dims, (tuple, list, range)) else (dims,))}
    for d in dims:
        b.pin(xs[d], loc)
    _keep_except(b, node, x, dict.fromkeys(dims, 0), loc)


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
    """matmul: a(..., n, k) @ b(..., k, m): k is contracted (coupled); a batch dim is the
    operands' own where their sizes match (one index set), a new pinned dim where one broadcasts."""
    x, y = node.args[0], node.args[1]
    xs, ys = b.out[x], b.out[y]
    if len(xs) < 2 or len(ys) < 2:
        couple_unknown(b, node, None)
        return
    b.union(xs[-1], ys[-2])
    shape = _shape(node)
    out = []
    for d in range(len(shape) - 2):  # batch dims (attention heads ...): the operands' own
        same = []
        for t, ts in ((x, xs), (y, ys)):
            e = d - (len(shape) - len(ts))
            if 0 <= e < len(ts) - 2 and _shape(t)[e] == shape[d] and shape[d] != 1:
                same.append(ts[e])
        for s in same[1:]:
            b.union(same[0], s)
        out.append(same[0] if same else b.new(shape[d], f"{node.name}:{d}", f"broadcast dims of {where(node, b.gm)}"))
    b.out[node] = out + [xs[-2], ys[-1]]


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
    if node.kwargs.get("enable_gqa") and len(qs) >= 3 and _shape(q)[-3] != _shape(k)[-3]:
        # grouped-query attention in the kernel: query head h reads key/value head h // (Hq / Hkv)
        hq, hkv = _shape(q)[-3], _shape(k)[-3]
        h = np.arange(hq)
        b.link(qs[-3], h, ks[-3], h // (hq // hkv))
        b.union(ks[-3], vs[-3])
    b.union(qs[-1], ks[-1])
    b.mark_stat(qs[-1])
    b.union(ks[-2], vs[-2])
    b.mark_stat(ks[-2])
    for d in range(len(qs) - 2):
        for t in (ks, vs):
            if b.sizes[b.find(t[d])] == b.sizes[b.find(qs[d])]:
                b.union(qs[d], t[d])
    # an additive mask or bias (BEiT's relative-position bias per head) broadcasts onto
    # the scores (..., L, S): its head dim goes with the query heads
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node) and isinstance(_shape(mask), tuple):  # a forward argument may hold None
        scores = _shape(q)[:-1] + (_shape(k)[-2],)
        if not _is_tensor(b, mask) or len(_shape(mask)) > len(scores):
            couple_unknown(b, node, mod, f"{where(node, b.gm)} with an attn_mask it cannot align with the scores")
            return
        broadcast_into(b, list(qs[:-1]) + [ks[-2]], scores, mask)
    b.out[node] = list(qs[:-1]) + [vs[-1]]


def couple_multiscale_roi_align(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """torchvision's MultiScaleRoIAlign(features, boxes, image_shapes): RoIAlign pools each
    channel on its own, so output channel c is channel c of every feature map it reads
    (all share one channel space); the RoIs and pooled positions are new dims, and the
    boxes carry no channels."""
    feats = _arg(node, 0, "x")
    used = [feats[k] for k in mod.featmap_names if k in feats] if isinstance(feats, dict) else []
    shape = _shape(node)
    if not used or not isinstance(shape, tuple) or len(shape) != 4 or not all(
            _is_tensor(b, f) and len(_shape(f)) == 4 and _shape(f)[1] == shape[1] for f in used):
        couple_unknown(b, node, mod, f"{where(node, b.gm)} on inputs it does not pool channel by channel")
        return
    pin = f"RoIs and pooled positions of {where(node, b.gm)}"
    out = [b.new(s, f"{node.name}:{d}", None if d == 1 else pin) for d, s in enumerate(shape)]
    for f in used:
        b.union(out[1], b.out[f][1])
    b.out[node] = out
