"""The op-rule table: how each op couples the channel spaces of its inputs and outputs.

One entry per op, keyed by module type (call_module), function object (call_function)
or ``"method:<name>"`` (call_method). A rule receives the builder, the node and, for
modules, the module and its path; it sets ``b.out[node]`` to the output's spaces (one
per dim, nested lists for tuple outputs) and records members, identities and maps.

An op with no entry is never guessed: the analysis pins every space it touches and the
reason names the op and the module path. Users add entries with `register_rule`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.graph.coupling import Builder, where
from fxslim.graph.trace import node_shapes

__all__ = ["RULES", "SHAPE_QUERIES", "Rule", "lookup_rule", "register_rule"]


@dataclass(frozen=True)
class Rule:
    """One table entry.

    Attributes:
        couple: fills the builder for one node: ``couple(b, node, mod, path)``.
        sync: after slicing, brings a module's attributes in line with its new
            parameter shapes: ``sync(mod)``. None for functions and parameter-free ops.
        fix_literals: after slicing, rewrites literal sizes in the node's arguments:
            ``fix_literals(node, new_sizes, kept, dynamic)``.
        attrs: module attributes that `sync` changes, each as (attribute, parameter,
            dim): the attribute follows that parameter dim (reported as group members);
            or a function of the module returning them.
    """

    couple: Callable
    sync: Callable | None = None
    fix_literals: Callable | None = None
    attrs: Any = ()


RULES: dict[Any, Rule] = {}

# Ops that read shapes or assert: they carry no channels and need no rule.
SHAPE_QUERIES = {
    "method:size", "method:dim", "method:numel", getattr, torch._assert,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv,
    operator.mod, operator.neg, math.sqrt, len, torch.sym_int, torch.sym_float, int, float,
}


def register_rule(key: Any, couple: Callable, sync: Callable | None = None,
                  fix_literals: Callable | None = None, attrs: tuple = ()) -> None:
    """Register (or replace) the coupling rule for a module type, function or method.

    Args:
        key: an nn.Module subclass, a function (e.g. ``torch.relu``) or
            ``"method:<name>"``.
        couple: ``couple(b, node, mod, path)``; see the helpers in this module
            (`elementwise`, `same_as_input`) for the common cases.
        sync: optional ``sync(mod)`` to update module attributes after slicing.
        fix_literals: optional ``fix_literals(node, new_sizes, kept, dynamic)``.
        attrs: optional (attribute, parameter, dim) triples that `sync` changes.

    Example:
        >>> register_rule(MySwish, elementwise)  # output channels == input channels
    """
    RULES[key] = Rule(couple, sync, fix_literals, attrs if callable(attrs) else tuple(attrs))


def literal_spaces(b: Builder, node: fx.Node, rule: Rule) -> list[int]:
    """Spaces whose new size a rule's `fix_literals` writes into the node's arguments."""
    fn = _LITERAL_DIMS.get(rule.fix_literals)
    return fn(b, node) if fn is not None else []


def lookup_rule(node: fx.Node, mod: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        t = type(mod)
        if t in RULES:
            return RULES[t]
        for base in t.__mro__[1:]:
            # a subclass inherits its parent's rule only if it keeps the parent's forward
            if base in RULES and t.forward is base.forward:
                return RULES[base]
        return None
    if node.op == "call_function":
        return RULES.get(node.target)
    if node.op == "call_method":
        return RULES.get(f"method:{node.target}")
    return None


def sync_of(mod: nn.Module) -> Callable | None:
    """The attribute-sync function for a module's type (inherited along the MRO)."""
    for t in type(mod).__mro__:
        rule = RULES.get(t)
        if rule is not None and rule.sync is not None:
            return rule.sync
    return None


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
    b.out[node] = list(b.out[x])


def _flat_args(node: fx.Node) -> list:
    out: list = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def _keep_except(b: Builder, node: fx.Node, x: fx.Node, new_dims: dict[int, int], pin: str | None) -> None:
    """Output = input with the listed dims replaced by fresh spaces (sizes from meta)."""
    shape = _shape(node)
    out = list(b.out[x])
    for d in new_dims:
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
            b.member(sid, kind, node.target, d, "norm")
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


def couple_unknown(b: Builder, node: fx.Node, mod: nn.Module | None) -> None:
    """No rule: pin everything the op touches; its outputs are new pinned spaces."""
    reason = f"no rule for {where(node, b.gm)}"
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


# ---------------------------------------------------------------------------------------
# layers


def couple_conv(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    """Conv: out channels are new (weight rows); groups stay whole."""
    x = node.args[0]
    xs, shape = b.out[x], _shape(node)
    nsp = mod.weight.dim() - 2
    cdim = len(shape) - nsp - 1
    out = list(xs[:cdim])
    oc = b.new(shape[cdim], f"{path}:out")
    b.module_members(oc, path, mod, [("weight", 0, "out"), ("bias", 0, "out")])
    out.append(oc)
    spin = f"spatial dim of {where(node, b.gm)}"
    out += [b.new(s, f"{path}:sp{d}", spin) for d, s in enumerate(shape[cdim + 1 :])]
    b.dynamic.update(out[cdim + 1 :])
    ic = xs[cdim]
    g = mod.groups
    if g == 1:
        b.member(ic, "param", f"{path}.weight", 1, "in")
    else:  # conv group k reads in[k*ipg:(k+1)*ipg] and writes out[k*opg:(k+1)*opg]
        ipg, opg = mod.in_channels // g, mod.out_channels // g
        b.tie_blocks(ic, ipg)
        b.tie_blocks(oc, opg)
        b.link(ic, np.arange(g) * ipg, oc, np.arange(g) * opg)
    b.out[node] = out


def sync_conv(mod: nn.Module) -> None:
    if mod.groups > 1:  # whole conv groups were removed: the per-group width is unchanged
        opg = mod.out_channels // mod.groups
        mod.groups = mod.weight.shape[0] // opg
    mod.out_channels = mod.weight.shape[0]
    mod.in_channels = mod.weight.shape[1] * mod.groups


def couple_conv_transpose(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    """ConvTranspose: weight is (in, out/groups, k...); grouped ones are pinned."""
    if mod.groups != 1:
        couple_unknown(b, node, mod)
        b.pin_struct(b.out[node], f"grouped {where(node, b.gm)} is not supported")
        return
    x = node.args[0]
    xs, shape = b.out[x], _shape(node)
    nsp = mod.weight.dim() - 2
    cdim = len(shape) - nsp - 1
    oc = b.new(shape[cdim], f"{path}:out")
    b.module_members(oc, path, mod, [("weight", 1, "out"), ("bias", 0, "out")])
    b.member(xs[cdim], "param", f"{path}.weight", 0, "in")
    spin = f"spatial dim of {where(node, b.gm)}"
    sp = [b.new(s, f"{path}:sp{d}", spin) for d, s in enumerate(shape[cdim + 1 :])]
    b.dynamic.update(sp)
    b.out[node] = list(xs[:cdim]) + [oc] + sp


def sync_conv_transpose(mod: nn.Module) -> None:
    mod.in_channels = mod.weight.shape[0]
    mod.out_channels = mod.weight.shape[1]


def couple_linear(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    """Linear: last dim of input is consumed (weight columns), a new last dim is produced."""
    x = node.args[0]
    xs, shape = b.out[x], _shape(node)
    b.member(xs[-1], "param", f"{path}.weight", 1, "in")
    oc = b.new(shape[-1], f"{path}:out")
    b.module_members(oc, path, mod, [("weight", 0, "out"), ("bias", 0, "out")])
    b.out[node] = list(xs[:-1]) + [oc]


def sync_linear(mod: nn.Module) -> None:
    mod.out_features, mod.in_features = mod.weight.shape


def couple_batchnorm(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    """BatchNorm: per-channel affine and running statistics on dim 1."""
    x = node.args[0]
    b.out[node] = list(b.out[x])
    c = b.out[x][1]
    b.module_members(
        c, path, mod,
        [("weight", 0, "norm"), ("bias", 0, "norm"), ("running_mean", 0, "norm"), ("running_var", 0, "norm")],
    )


def sync_batchnorm(mod: nn.Module) -> None:
    t = mod.weight if mod.weight is not None else mod.running_mean
    if t is not None:
        mod.num_features = t.shape[0]


def couple_instancenorm(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    """InstanceNorm: statistics over spatial dims only; per-channel affine on the channel dim."""
    x = node.args[0]
    xs = b.out[x]
    nsp = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[type(mod)]
    c = xs[len(xs) - nsp - 1]
    b.out[node] = list(xs)
    b.module_members(
        c, path, mod,
        [("weight", 0, "norm"), ("bias", 0, "norm"), ("running_mean", 0, "norm"), ("running_var", 0, "norm")],
    )


def couple_layernorm(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    """LayerNorm: normalises (a statistic) over the last dims; affine on them."""
    x = node.args[0]
    xs = b.out[x]
    b.out[node] = list(xs)
    nd = len(mod.normalized_shape)
    if nd != 1:
        for s in xs[-nd:]:
            b.pin(s, f"{where(node, b.gm)} normalises over several dims")
        return
    b.mark_stat(xs[-1])
    b.module_members(xs[-1], path, mod, [("weight", 0, "norm"), ("bias", 0, "norm")])


def sync_layernorm(mod: nn.Module) -> None:
    if mod.weight is not None:
        mod.normalized_shape = (mod.weight.shape[0],)


def couple_groupnorm(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    """GroupNorm: whole groups go (their statistics are their own), so no other group changes."""
    x = node.args[0]
    xs = b.out[x]
    b.out[node] = list(xs)
    c = xs[1]
    b.tie_blocks(c, mod.num_channels // mod.num_groups)
    b.module_members(c, path, mod, [("weight", 0, "norm"), ("bias", 0, "norm")])


def sync_groupnorm(mod: nn.Module) -> None:
    if mod.weight is not None:
        cpg = mod.num_channels // mod.num_groups
        mod.num_channels = mod.weight.shape[0]
        mod.num_groups = mod.num_channels // cpg


def couple_stat_dim(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """Softmax/LRN: shape-preserving, but a statistic over a dim (marked, not pinned)."""
    x = node.args[0] if node.args else node.kwargs["input"]
    xs = b.out[x]
    b.out[node] = list(xs)
    if mod is not None and hasattr(mod, "dim") and mod.dim is not None:
        d = mod.dim
    elif isinstance(mod, (nn.LocalResponseNorm, nn.CrossMapLRN2d)):
        d = 1
    else:
        d = _arg(node, 1, "dim")
    if d is None:
        b.pin_struct(xs, f"{where(node, b.gm)} with implicit dim")
        return
    b.mark_stat(xs[_dim(d, len(xs))])


def couple_prelu(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    x = node.args[0]
    xs = b.out[x]
    b.out[node] = list(xs)
    if mod.num_parameters > 1:
        b.member(xs[1 if len(xs) > 1 else 0], "param", f"{path}.weight", 0, "norm")


def sync_prelu(mod: nn.Module) -> None:
    mod.num_parameters = mod.weight.shape[0]


def couple_embedding(b: Builder, node: fx.Node, mod: nn.Module, path: str) -> None:
    """Embedding: index dims pass through, a new last dim (weight columns) is produced."""
    x = node.args[0]
    shape = _shape(node)
    e = b.new(shape[-1], f"{path}:out")
    b.member(e, "param", f"{path}.weight", 1, "out")
    b.out[node] = list(b.out[x]) + [e]


def sync_embedding(mod: nn.Module) -> None:
    mod.embedding_dim = mod.weight.shape[1]


def couple_mha(b: Builder, node: fx.Node, mod: nn.MultiheadAttention, path: str) -> None:
    """nn.MultiheadAttention, pruned by whole heads.

    torch requires the query's embed dim to equal num_heads x head_dim, so the input
    embed dim, the q/k/v projections and the out projection's input are one index set;
    each head's head_dim channels form one unit (head_dim and the 1/sqrt(head_dim) scale
    stay as they were, so removing a head changes no other head).
    """
    q = _arg(node, 0, "query")
    k = _arg(node, 1, "key")
    v = _arg(node, 2, "value")
    shapes = _shape(node)
    if not mod._qkv_same_embed_dim or not all(isinstance(t, fx.Node) for t in (q, k, v)):
        couple_unknown(b, node, mod)
        return
    e = b.out[q][-1]
    b.union(e, b.out[k][-1])
    b.union(e, b.out[v][-1])
    emb = mod.embed_dim
    b.tie_blocks(e, mod.head_dim)
    b.member(e, "param", f"{path}.in_proj_weight", 1, "in")
    qkv = b.new(3 * emb, f"{path}:qkv")
    idx = np.arange(3 * emb)
    b.link(qkv, idx, e, idx % emb)
    b.module_members(qkv, path, mod, [("in_proj_weight", 0, "out"), ("in_proj_bias", 0, "out")])
    for name in ("bias_k", "bias_v"):
        if getattr(mod, name, None) is not None:
            b.member(e, "param", f"{path}.{name}", 2, "out")
    b.member(e, "param", f"{path}.out_proj.weight", 1, "in")
    oc = b.new(shapes[0][-1], f"{path}:out")
    b.module_members(oc, f"{path}.out_proj", mod.out_proj, [("weight", 0, "out"), ("bias", 0, "out")])
    out0 = list(b.out[q][:-1]) + [oc]
    out1 = _fresh_struct(b, shapes[1], f"{node.name}.1", f"attention weights of {where(node, b.gm)}")
    b.out[node] = [out0, out1]


def sync_mha(mod: nn.MultiheadAttention) -> None:
    head_dim = mod.head_dim
    mod.embed_dim = mod.kdim = mod.vdim = mod.in_proj_weight.shape[1]
    mod.num_heads = mod.embed_dim // head_dim
    mod.head_dim = head_dim
    mod.out_proj.in_features = mod.out_proj.weight.shape[1]
    mod.out_proj.out_features = mod.out_proj.weight.shape[0]


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
    x = node.args[0]
    xs = b.out[x]
    r = mod.upscale_factor if mod is not None else _arg(node, 1, "upscale_factor")
    shape = _shape(node)
    cd = len(shape) - 3
    out = list(xs[:cd])
    c = b.new(shape[cd], f"{node.name}:{cd}")
    f = np.arange(_shape(x)[cd])
    b.link(xs[cd], f, c, f // (r * r))
    out.append(c)
    loc = f"spatial dim of {where(node, b.gm)}"
    out += [b.new(shape[d], f"{node.name}:{d}", loc) for d in (cd + 1, cd + 2)]
    b.out[node] = out


def couple_pixel_unshuffle(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """pixel_unshuffle(r): output channels c*r^2 .. c*r^2 + r^2 - 1 come from input channel c."""
    x = node.args[0]
    xs = b.out[x]
    r = mod.downscale_factor if mod is not None else _arg(node, 1, "downscale_factor")
    shape = _shape(node)
    cd = len(shape) - 3
    c = b.new(shape[cd], f"{node.name}:{cd}")
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


# ---------------------------------------------------------------------------------------
# the table

_ELEMENTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.imul, operator.isub,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.sqrt,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.where, torch.maximum, torch.minimum,
    torch.pow, torch.rsqrt, torch.erf, torch.square, torch.nn.functional.hardtanh,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.hardtanh,
]
_ELEMENTWISE_METHODS = [
    "add", "sub", "mul", "div", "neg", "abs", "exp", "sqrt", "relu", "sigmoid", "tanh", "clamp",
    "pow", "add_", "mul_", "sub_", "div_", "relu_", "sigmoid_", "float", "half", "double", "to",
    "type_as", "contiguous", "clone", "detach", "masked_fill", "__add__", "__mul__", "rsqrt",
    "square", "clamp_min", "clamp_max",
]
_ELEMENTWISE_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
]

for _f in _ELEMENTWISE_FUNCS:  # the output's channels are the inputs' channels
    register_rule(_f, elementwise)
for _m in _ELEMENTWISE_METHODS:
    register_rule(f"method:{_m}", elementwise)
for _m in _ELEMENTWISE_MODULES:
    register_rule(_m, elementwise)

def _CONV_ATTRS(mod: nn.Module) -> tuple:
    if mod.groups == 1:
        return (("out_channels", "weight", 0), ("in_channels", "weight", 1))
    return (("out_channels", "weight", 0), ("groups", "weight", 0), ("in_channels", "weight", 0))
_NORM_ATTRS = (("num_features", "weight", 0), ("num_features", "running_mean", 0))
for _c in (nn.Conv1d, nn.Conv2d, nn.Conv3d):  # out = new space; in = weight columns
    register_rule(_c, couple_conv, sync_conv, attrs=_CONV_ATTRS)
for _c in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_c, couple_conv_transpose, sync_conv_transpose,
                  attrs=(("in_channels", "weight", 0), ("out_channels", "weight", 1)))
register_rule(nn.Linear, couple_linear, sync_linear,
              attrs=(("out_features", "weight", 0), ("in_features", "weight", 1)))  # last dim: in -> new out
for _c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    register_rule(_c, couple_batchnorm, sync_batchnorm, attrs=_NORM_ATTRS)  # per-channel affine, stats
for _c in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_rule(_c, couple_instancenorm, sync_batchnorm, attrs=_NORM_ATTRS)
register_rule(nn.LayerNorm, couple_layernorm, sync_layernorm, attrs=(("normalized_shape", "weight", 0),))  # stat over last dim
register_rule(nn.GroupNorm, couple_groupnorm, sync_groupnorm,
              attrs=(("num_channels", "weight", 0), ("num_groups", "weight", 0)))  # whole groups
for _c in (nn.Softmax, nn.LogSoftmax, nn.LocalResponseNorm, nn.CrossMapLRN2d):
    register_rule(_c, couple_stat_dim)  # shape-preserving statistic over one dim
register_rule(nn.PReLU, couple_prelu, sync_prelu, attrs=(("num_parameters", "weight", 0),))
register_rule(nn.Embedding, couple_embedding, sync_embedding, attrs=(("embedding_dim", "weight", 1),))
register_rule(nn.MultiheadAttention, couple_mha, sync_mha,
              attrs=(("embed_dim", "in_proj_weight", 1), ("num_heads", "in_proj_weight", 1)))  # whole heads
for _n, _cs in ((1, (nn.MaxPool1d, nn.AvgPool1d, nn.LPPool1d, nn.ConstantPad1d, nn.ZeroPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d)),
                (2, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d, nn.ConstantPad2d, nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)),
                (3, (nn.MaxPool3d, nn.AvgPool3d, nn.ConstantPad3d, nn.ZeroPad3d, nn.ReflectionPad3d, nn.ReplicationPad3d))):
    for _c in _cs:  # channels pass through, spatial dims are new
        register_rule(_c, _pool(_n))
for _c in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):
    register_rule(_c, couple_adaptive_pool)
for _c in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    register_rule(_c, couple_interpolate)
register_rule(nn.PixelShuffle, couple_pixel_shuffle)  # c <- c*r^2 .. (c+1)*r^2
register_rule(nn.PixelUnshuffle, couple_pixel_unshuffle)
register_rule(nn.ChannelShuffle, couple_channel_shuffle)  # out[j*g+i] = in[i*cpg+j]
register_rule(nn.Flatten, couple_reshape)  # strided merge
register_rule(nn.Unflatten, couple_reshape)

for _f in (F.max_pool1d, F.avg_pool1d):
    register_rule(_f, _spatial_ops(1))
for _f in (F.max_pool2d, F.avg_pool2d, F.lp_pool2d):
    register_rule(_f, _spatial_ops(2))
for _f in (F.max_pool3d, F.avg_pool3d):
    register_rule(_f, _spatial_ops(3))
for _f in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
           F.adaptive_max_pool2d):
    register_rule(_f, couple_adaptive_pool)
register_rule(F.interpolate, couple_interpolate)
register_rule(F.pad, couple_pad)
register_rule(F.pixel_shuffle, couple_pixel_shuffle)
register_rule(F.pixel_unshuffle, couple_pixel_unshuffle)
register_rule(torch.pixel_shuffle, couple_pixel_shuffle)
register_rule(torch.channel_shuffle, couple_channel_shuffle)
register_rule(F.softmax, couple_stat_dim)
register_rule(F.log_softmax, couple_stat_dim)
register_rule(torch.softmax, couple_stat_dim)
register_rule("method:softmax", couple_stat_dim)
register_rule("method:log_softmax", couple_stat_dim)
register_rule(F.linear, couple_linear_fn)
register_rule(F.layer_norm, couple_layer_norm_fn, fix_literals=fix_layer_norm_fn)
register_rule(F.scaled_dot_product_attention, couple_sdpa)

register_rule(torch.cat, couple_cat)  # inputs at offsets
register_rule(torch.concat, couple_cat)
register_rule(torch.stack, couple_stack)
for _k in (torch.split, torch.chunk, "method:split", "method:chunk"):
    register_rule(_k, couple_split, fix_literals=fix_split)  # ranges of the input
register_rule(torch.unbind, couple_unbind)
register_rule("method:unbind", couple_unbind)
register_rule(operator.getitem, couple_getitem, fix_literals=fix_getitem)
for _k in ("method:view", "method:reshape", torch.reshape, "method:flatten", torch.flatten,
           "method:unflatten", torch.unflatten):
    fix = fix_shape_args if _k in ("method:view", "method:reshape", torch.reshape) else None
    register_rule(_k, couple_reshape, fix_literals=fix)
for _k in (torch.permute, "method:permute"):
    register_rule(_k, couple_permute)  # dims move, spaces follow
for _k in (torch.transpose, "method:transpose", torch.swapaxes, "method:swapaxes"):
    register_rule(_k, couple_transpose)
register_rule("method:t", couple_t)
for _k in (torch.unsqueeze, "method:unsqueeze"):
    register_rule(_k, couple_unsqueeze)
for _k in (torch.squeeze, "method:squeeze"):
    register_rule(_k, couple_squeeze)
register_rule("method:expand", couple_expand, fix_literals=fix_shape_args)
for _k in (torch.mean, "method:mean"):
    register_rule(_k, _reduce(stat=True))  # a mean over channels is a statistic
for _k in (torch.sum, "method:sum", torch.amax, "method:amax"):
    register_rule(_k, _reduce(stat=False))
for _k in (torch.matmul, operator.matmul, "method:matmul", torch.bmm):
    register_rule(_k, couple_matmul)
register_rule(torch.einsum, couple_einsum)


_LITERAL_DIMS = {
    fix_split: literal_dims_split,
    fix_getitem: literal_dims_getitem,
    fix_shape_args: literal_dims_shape,
    fix_layer_norm_fn: literal_dims_layer_norm,
}


def _register_torchvision() -> None:
    """torchvision's wrapped ops that are plain identities on channels."""
    try:
        from torchvision.ops import stochastic_depth
        from torchvision.ops.misc import Permute
    except Exception:  # torchvision is optional
        return
    register_rule(stochastic_depth, same_as_input)  # drops whole samples or rows, never channels
    register_rule(Permute, couple_permute)


_register_torchvision()
