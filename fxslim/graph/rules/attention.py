"""Rules for attention layers: ``nn.MultiheadAttention`` and torchvision Swin's windowed
attention (its relative-position bias and patch-merging pad), by whole heads.

Like the other layer rules, each serves the module and its function form; the ``fix_*``
functions bring the function form's size arguments in line after a prune.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import fx, nn

from fxslim.graph.coupling import Builder, where
from fxslim.graph.rules.common import _arg, _fresh_struct, _shape, couple_unknown
from fxslim.graph.rules.layers import _set_arg
from fxslim.graph.rules.operands import FUNCTION_ARGS, layer_operands


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
    b.attention[node.name] = (f"{path}.in_proj_weight", e)
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


def couple_window_attention(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """torchvision's shifted_window_attention (Swin v1 and v2), by whole heads.

    Its embed dim is the input's C (head_dim = C // num_heads; the output is viewed back
    with C), so, as in nn.MultiheadAttention, the input channels, the q/k/v rows and both
    sides of the projection are one index set tied in head_dim blocks; the relative-position
    bias (1, heads, N, N) and the v2 logit scale (heads, 1, 1) follow the heads.
    """
    op = layer_operands(b, node, None, None, ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias", "logit_scale"),
                        ("num_heads",))
    if op is None:
        return
    xs = b.out[op.x]
    c, nh = _shape(op.x)[-1], op.settings["num_heads"]
    hd = c // nh
    e = xs[-1]
    b.tie_blocks(e, hd)
    qkv = b.new(3 * c, f"{node.name}:qkv")
    idx = np.arange(3 * c)
    b.link(qkv, idx, e, idx % c)
    op.member(b, qkv, "qkv_weight", 0, "out")
    op.member(b, qkv, "qkv_bias", 0, "out")
    op.member(b, e, "qkv_weight", 1, "in")
    op.member(b, e, "proj_weight", 1, "in")
    op.member(b, e, "proj_weight", 0, "out")  # the output is viewed back with the input's C
    op.member(b, e, "proj_bias", 0, "out")
    heads = b.new(nh, f"{node.name}:heads")
    i = np.arange(c)
    b.link(e, i, heads, i // hd)
    op.member(b, heads, "logit_scale", 0, "norm")
    bias = _arg(node, FUNCTION_ARGS[node.target].index("relative_position_bias"), "relative_position_bias")
    if isinstance(bias, fx.Node) and b.out.get(bias) is not None:
        b.union(b.out[bias][-3], heads)
    b.attention[node.name] = (op.params["qkv_weight"].target, heads)
    b.out[node] = list(xs)


def literal_dims_window_attention(b: Builder, node: fx.Node) -> list[int]:
    return [b.out[node.args[0]][-1]]


def fix_window_attention(node: fx.Node, new_sizes: Callable, kept: Callable, dynamic: Callable) -> None:
    """num_heads follows the input's channels; head_dim (C // num_heads) stays."""
    i = FUNCTION_ARGS[node.target].index("num_heads")
    nh = _arg(node, i, "num_heads")
    x = node.args[0]
    hd = int(x.meta["tensor_meta"].shape[-1]) // nh
    _set_arg(node, i, "num_heads", new_sizes(x, None)[-1] // hd)


def couple_relative_position_bias(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """torchvision's _get_relative_position_bias(table, index, window): the table's rows,
    gathered by index, become (1, heads, N, N); the heads are the table's columns."""
    table, index = node.args[0], node.args[1]
    ts, shape = b.out[table], _shape(node)
    loc = f"gathered by an index tensor in {where(node, b.gm)}"
    b.pin(ts[0], loc)
    if table.op == "get_attr":  # the table's rows are positions, not channels
        b.not_channels(table.target, 0, loc)
    b.pin_struct(b.out.get(index), loc)
    b.out[node] = [b.new(shape[0], f"{node.name}:0", loc), ts[1],
                   b.new(shape[2], f"{node.name}:2", loc), b.new(shape[3], f"{node.name}:3", loc)]


def couple_patch_merging_pad(b: Builder, node: fx.Node, mod=None, path=None) -> None:
    """torchvision Swin's _patch_merging_pad: the four pixels of each 2x2 block (after padding
    H, W to even) concatenated on the channel dim: output channel k*C + c is input channel c."""
    x = node.args[0]
    xs, shape = b.out[x], _shape(node)
    c = _shape(x)[-1]
    loc = f"spatial dim of {where(node, b.gm)}"
    sp = [b.new(shape[d], f"{node.name}:{d}", loc) for d in (-3, -2)]
    b.dynamic.update(sp)
    oc = b.new(shape[-1], f"{node.name}:c")
    for k in range(4):
        b.link(xs[-1], np.arange(c), oc, k * c + np.arange(c))
    b.out[node] = list(xs[:-3]) + sp + [oc]
