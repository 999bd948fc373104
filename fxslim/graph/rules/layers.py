"""Rules for layers (call_module): convolutions, linear, norms, embeddings, attention."""

from __future__ import annotations

import numpy as np
from torch import fx, nn

from fxslim.graph.coupling import Builder, where
from fxslim.graph.rules.common import _arg, _dim, _fresh_struct, _shape, couple_unknown

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
