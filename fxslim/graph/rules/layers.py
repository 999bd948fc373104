"""Rules for layers: convolutions, linear, norms, embeddings, PReLU (attention: `attention`).

Each layer rule serves both forms of its op: the module (``nn.Conv2d`` at 'conv1') and
the function with parameter operands (``F.conv2d(x, conv1.weight, ...)``), through
`layer_operands`. The module form's attributes are brought in line by the ``sync_*``
functions (for any module that owns a sliced parameter, subclasses included); the
function form's size arguments by the ``fix_*`` functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import fx, nn

from fxslim.graph.coupling import Builder, where
from fxslim.graph.rules.common import _arg, _dim, _shape, couple_unknown
from fxslim.graph.rules.operands import FUNCTION_ARGS, layer_operands

# ---------------------------------------------------------------------------------------
# layers

_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _all_equal(v: Any, n: int) -> bool:
    return all(x == n for x in v) if isinstance(v, (tuple, list)) else v == n


def _pointwise(w_shape: tuple[int, ...], settings: dict[str, Any]) -> bool:
    """A 1x1 conv with stride 1 and no padding: output position p reads input position p."""
    pad = settings["padding"]
    return (all(k == 1 for k in w_shape[2:]) and _all_equal(settings["stride"], 1)
            and (isinstance(pad, str) or _all_equal(pad, 0)))


def couple_conv(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """Conv: out channels are new (weight rows), in channels are weight columns; conv
    groups stay whole (group k reads in[k*ipg:(k+1)*ipg], writes out[k*opg:(k+1)*opg]).
    Spatial dims: a pointwise conv maps position p to p (input and output share the
    space); any other mixes neighbouring positions, so the input's are pinned (CoaT runs
    a Conv1d across stacked features: its length dim is a channel dim of the model)."""
    op = layer_operands(b, node, mod, path, ("weight", "bias"), ("groups", "stride", "padding"))
    if op is None:
        return
    w = op.params["weight"]
    xs, shape = b.out[op.x], _shape(node)
    loc = where(node, b.gm)
    nsp = len(w.shape) - 2
    cdim = len(shape) - nsp - 1
    out = list(xs[:cdim])
    oc = b.new(shape[cdim], f"{op.label}:out")
    op.member(b, oc, "weight", 0, "out")
    op.member(b, oc, "bias", 0, "out")
    op.not_channels(b, "weight", range(2, 2 + nsp), f"kernel dim of {loc}")
    out.append(oc)
    if _pointwise(w.shape, op.settings):  # output position p = input position p
        out += list(xs[cdim + 1 :])
    else:
        for s in xs[cdim + 1 :]:
            b.pin(s, f"spatial dim of {loc}")
        out += [b.new(s, f"{op.label}:sp{d}", f"spatial dim of {loc}") for d, s in enumerate(shape[cdim + 1 :])]
        b.dynamic.update(out[cdim + 1 :])
    ic = xs[cdim]
    g = op.settings["groups"]
    if g == 1:
        op.member(b, ic, "weight", 1, "in")
    else:
        ipg, opg = w.shape[1], w.shape[0] // g
        op.not_channels(b, "weight", (1,), f"per-group input dim of {loc}")
        b.tie_blocks(ic, ipg)
        b.tie_blocks(oc, opg)
        b.link(ic, np.arange(g) * ipg, oc, np.arange(g) * opg)
    b.weights[node.name] = w.target
    b.out[node] = out


def sync_conv(mod: nn.Module) -> None:
    if mod.groups > 1:  # whole conv groups were removed: the per-group width is unchanged
        opg = mod.out_channels // mod.groups
        mod.groups = mod.weight.shape[0] // opg
    mod.out_channels = mod.weight.shape[0]
    mod.in_channels = mod.weight.shape[1] * mod.groups


def literal_dims_conv(b: Builder, node: fx.Node) -> list[int]:
    """F.convNd(..., groups=g > 1): g is written in the call and follows the out channels."""
    w = _arg(node, 1, "weight")
    g = _arg(node, FUNCTION_ARGS[node.target].index("groups"), "groups", 1)
    return [b.out[w][0]] if g != 1 and isinstance(w, fx.Node) and b.out.get(w) else []


def fix_conv_groups(node: fx.Node, new_sizes: Callable, kept: Callable, dynamic: Callable) -> None:
    """Whole conv groups went: the new group count is the new out channels over the old
    per-group width."""
    i = FUNCTION_ARGS[node.target].index("groups")
    g = _arg(node, i, "groups", 1)
    w = _arg(node, 1, "weight")
    if g == 1 or not isinstance(w, fx.Node) or w.op != "get_attr":
        return
    opg = int(w.meta["tensor_meta"].shape[0]) // g
    _set_arg(node, i, "groups", new_sizes(w, None)[0] // opg)


def _set_arg(node: fx.Node, i: int, name: str, value) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def couple_conv_transpose(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """ConvTranspose: weight is (in, out/groups, k...); grouped ones are pinned."""
    op = layer_operands(b, node, mod, path, ("weight", "bias"), ("groups",))
    if op is None:
        return
    loc = where(node, b.gm)
    if op.settings["groups"] != 1:
        couple_unknown(b, node, mod, f"grouped {loc} is not supported")
        return
    w = op.params["weight"]
    xs, shape = b.out[op.x], _shape(node)
    nsp = len(w.shape) - 2
    cdim = len(shape) - nsp - 1
    oc = b.new(shape[cdim], f"{op.label}:out")
    op.member(b, oc, "weight", 1, "out")
    op.member(b, oc, "bias", 0, "out")
    op.member(b, xs[cdim], "weight", 0, "in")
    op.not_channels(b, "weight", range(2, 2 + nsp), f"kernel dim of {loc}")
    sp = [b.new(s, f"{op.label}:sp{d}", f"spatial dim of {loc}") for d, s in enumerate(shape[cdim + 1 :])]
    b.dynamic.update(sp)
    b.weights[node.name] = w.target
    b.out[node] = list(xs[:cdim]) + [oc] + sp


def sync_conv_transpose(mod: nn.Module) -> None:
    mod.in_channels = mod.weight.shape[0]
    mod.out_channels = mod.weight.shape[1]


def couple_linear(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """Linear: last dim of input is consumed (weight columns), a new last dim is produced."""
    op = layer_operands(b, node, mod, path, ("weight", "bias"))
    if op is None:
        return
    w = op.params["weight"]
    xs, shape = b.out[op.x], _shape(node)
    if len(w.shape) != 2:  # F.linear with a 1-d weight: a dot product over channels
        couple_unknown(b, node, mod, f"{where(node, b.gm)} with a {len(w.shape)}-d weight")
        return
    _couple_matrix(b, node, op, xs, shape, in_dim=1, out_dim=0)


def _couple_matrix(b: Builder, node: fx.Node, op, xs: list, shape: tuple, in_dim: int, out_dim: int) -> None:
    """x @ W (+ bias): x's last dim is W's `in_dim`, the output's new last dim W's `out_dim`."""
    op.member(b, xs[-1], "weight", in_dim, "in")
    oc = b.new(shape[-1], f"{op.label}:out")
    op.member(b, oc, "weight", out_dim, "out")
    op.member(b, oc, "bias", 0, "out")
    b.weights[node.name] = op.params["weight"].target
    b.out[node] = list(xs[:-1]) + [oc]


def couple_addmm(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """addmm(bias, x, W) = bias + x @ W: a Linear whose weight is stored (in, out), as in
    GPT-2's Conv1D: x's last dim is W's rows (in), the new last dim W's columns (out)."""
    if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
        couple_unknown(b, node, None, f"{where(node, b.gm)} scales its terms (beta/alpha)")
        return
    op = layer_operands(b, node, None, None, ("bias", "weight"))
    if op is None:
        return
    _couple_matrix(b, node, op, b.out[op.x], _shape(node), in_dim=0, out_dim=1)


def sync_linear(mod: nn.Module) -> None:
    mod.out_features, mod.in_features = mod.weight.shape


def _per_channel(b: Builder, node: fx.Node, op, cdim: int) -> None:
    """Output = input; every norm tensor present is per channel of dim `cdim`."""
    xs = b.out[op.x]
    b.out[node] = list(xs)
    for name in _NORM_TENSORS:
        op.member(b, xs[cdim], name, 0, "norm")


def couple_batchnorm(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """BatchNorm: per-channel affine and running statistics on dim 1 (batch statistics in
    training are over N and space, per channel)."""
    op = layer_operands(b, node, mod, path, _NORM_TENSORS)
    if op is not None:
        _per_channel(b, node, op, 1)


def sync_batchnorm(mod: nn.Module) -> None:
    t = mod.weight if mod.weight is not None else mod.running_mean
    if t is not None:
        mod.num_features = t.shape[0]


_INSTANCE_NORMS = ((nn.InstanceNorm1d, 1), (nn.InstanceNorm2d, 2), (nn.InstanceNorm3d, 3))


def couple_instancenorm(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """InstanceNorm: statistics over spatial dims only; per-channel affine on the channel dim
    (the module also takes unbatched inputs; the function needs a batch dim)."""
    op = layer_operands(b, node, mod, path, _NORM_TENSORS)
    if op is None:
        return
    cdim = 1
    if mod is not None:
        nsp = next(n for cls, n in _INSTANCE_NORMS if isinstance(mod, cls))
        cdim = len(b.out[op.x]) - nsp - 1
    _per_channel(b, node, op, cdim)


def couple_layernorm(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """LayerNorm: normalises (a statistic) over the last dims; affine on them. Over one dim
    its channels go one by one; over several, the dims are pinned."""
    op = layer_operands(b, node, mod, path, ("weight", "bias"), ("normalized_shape",))
    if op is None:
        return
    xs = b.out[op.x]
    b.out[node] = list(xs)
    ns = op.settings["normalized_shape"]
    nd = 1 if isinstance(ns, int) else len(ns)
    for i in range(nd):
        for name in ("weight", "bias"):
            op.member(b, xs[len(xs) - nd + i], name, i, "norm")
    loc = where(node, b.gm)
    if nd != 1:
        for s in xs[-nd:]:
            b.pin(s, f"{loc} normalises over several dims")
    elif not op.function and "weight" not in op.params:
        b.pin(xs[-1], f"{loc} has no affine parameters to follow a pruned normalized_shape")
    b.mark_stat(xs[-1])


def sync_layernorm(mod: nn.Module) -> None:
    if mod.weight is not None:
        mod.normalized_shape = (mod.weight.shape[0],)


def literal_dims_layer_norm(b: Builder, node: fx.Node) -> list[int]:
    ns = _arg(node, 1, "normalized_shape")
    return [b.out[node.args[0]][-1]] if isinstance(ns, int) or len(ns) == 1 else []


def fix_layer_norm_fn(node: fx.Node, new_sizes: Callable, kept: Callable, dynamic: Callable) -> None:
    """F.layer_norm over one dim: normalized_shape is that dim's new size."""
    ns = _arg(node, 1, "normalized_shape")
    if isinstance(ns, int) or len(ns) == 1:
        _set_arg(node, 1, "normalized_shape", (new_sizes(node.args[0], None)[-1],))


def couple_groupnorm(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """GroupNorm: whole groups go (their statistics are their own), so no other group
    changes; with one group the statistic spans every channel (like LayerNorm): channels
    go one by one, through a statistic."""
    op = layer_operands(b, node, mod, path, ("weight", "bias"), ("num_groups",))
    if op is None:
        return
    xs = b.out[op.x]
    b.out[node] = list(xs)
    c, g = xs[1], op.settings["num_groups"]
    if g == 1:
        b.mark_stat(c)
    else:
        b.tie_blocks(c, _shape(op.x)[1] // g)
        if not op.function and "weight" not in op.params:
            b.pin(c, f"{where(node, b.gm)} has no affine parameters to follow a pruned num_groups")
    for name in ("weight", "bias"):
        op.member(b, c, name, 0, "norm")


def sync_groupnorm(mod: nn.Module) -> None:
    if mod.weight is not None:
        c = mod.weight.shape[0]
        if mod.num_groups > 1:  # whole groups went: the per-group width is unchanged
            mod.num_groups = c // (mod.num_channels // mod.num_groups)
        mod.num_channels = c


def literal_dims_group_norm(b: Builder, node: fx.Node) -> list[int]:
    return [b.out[node.args[0]][1]] if _arg(node, 1, "num_groups") != 1 else []


def fix_group_norm_fn(node: fx.Node, new_sizes: Callable, kept: Callable, dynamic: Callable) -> None:
    """F.group_norm(x, g > 1): whole groups went, the per-group width is unchanged."""
    g = _arg(node, 1, "num_groups")
    if g != 1:
        x = node.args[0]
        cpg = int(x.meta["tensor_meta"].shape[1]) // g
        _set_arg(node, 1, "num_groups", new_sizes(x, None)[1] // cpg)


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


def couple_prelu(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """PReLU: one slope per channel (dim 1, or dim 0 unbatched), or one shared slope."""
    op = layer_operands(b, node, mod, path, ("weight",))
    if op is None:
        return
    xs = b.out[op.x]
    b.out[node] = list(xs)
    w = op.params.get("weight")
    if w is not None and w.shape[0] > 1:
        op.member(b, xs[1 if len(xs) > 1 else 0], "weight", 0, "norm")


def sync_prelu(mod: nn.Module) -> None:
    mod.num_parameters = mod.weight.shape[0]


def couple_embedding(b: Builder, node: fx.Node, mod: nn.Module | None = None, path: str | None = None) -> None:
    """Embedding: index dims pass through, a new last dim (weight columns) is produced; a
    max_norm renormalises rows by their norm over that dim (a statistic)."""
    op = layer_operands(b, node, mod, path, ("weight",), ("max_norm",))
    if op is None:
        return
    shape = _shape(node)
    e = b.new(shape[-1], f"{op.label}:out")
    op.member(b, e, "weight", 1, "out")
    op.not_channels(b, "weight", (0,), f"vocabulary of {where(node, b.gm)}")
    if op.settings["max_norm"] is not None:
        b.mark_stat(e)
    b.out[node] = list(b.out[op.x]) + [e]


def sync_embedding(mod: nn.Module) -> None:
    mod.embedding_dim = mod.weight.shape[1]
