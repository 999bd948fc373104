"""The op-rule table: one registration per op."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.graph.coupling import Builder
from fxslim.graph.rules.attention import (
    couple_mha,
    couple_patch_merging_pad,
    couple_relative_position_bias,
    couple_window_attention,
    fix_window_attention,
    literal_dims_window_attention,
    sync_mha,
)
from fxslim.graph.rules.base import Rule, register_rule
from fxslim.graph.rules.common import elementwise, same_as_input
from fxslim.graph.rules.layers import (
    couple_addmm,
    couple_batchnorm,
    couple_conv,
    couple_conv_transpose,
    couple_embedding,
    couple_groupnorm,
    couple_instancenorm,
    couple_layernorm,
    couple_linear,
    couple_prelu,
    couple_stat_dim,
    fix_conv_groups,
    fix_group_norm_fn,
    fix_layer_norm_fn,
    literal_dims_conv,
    literal_dims_group_norm,
    literal_dims_layer_norm,
    sync_batchnorm,
    sync_conv,
    sync_conv_transpose,
    sync_embedding,
    sync_groupnorm,
    sync_layernorm,
    sync_linear,
    sync_prelu,
)
from fxslim.graph.rules.operands import FUNCTION_ARGS
from fxslim.graph.rules.tensor_ops import (
    _pool,
    _reduce,
    couple_adaptive_pool,
    couple_cat,
    couple_channel_shuffle,
    couple_einsum,
    couple_getitem,
    couple_interpolate,
    couple_matmul,
    couple_multiscale_roi_align,
    couple_pad,
    couple_pixel_shuffle,
    couple_pixel_unshuffle,
    couple_roll,
    couple_sdpa,
    couple_split,
    couple_stack,
    couple_unbind,
    fix_getitem,
    fix_split,
    literal_dims_getitem,
    literal_dims_split,
)
from fxslim.graph.rules.views import (
    couple_expand,
    couple_permute,
    couple_reshape,
    couple_squeeze,
    couple_t,
    couple_transpose,
    couple_unsqueeze,
    fix_shape_args,
    literal_dims_shape,
)


def literal_spaces(b: Builder, node: fx.Node, rule: Rule) -> list[int]:
    """Spaces whose new size a rule's `fix_literals` writes into the node's arguments."""
    fn = _LITERAL_DIMS.get(rule.fix_literals)
    return fn(b, node) if fn is not None else []



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
    "pow", "add_", "mul_", "sub_", "div_", "relu_", "sigmoid_", "masked_fill", "__add__", "__mul__",
    "rsqrt", "square", "clamp_min", "clamp_max",
]
# the input itself, in another dtype or memory (x.to(y) takes only y's dtype and device)
_SAME_AS_INPUT_METHODS = ["float", "half", "double", "to", "type_as", "contiguous", "clone", "detach"]
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
for _m in _SAME_AS_INPUT_METHODS:
    register_rule(f"method:{_m}", same_as_input)
for _m in _ELEMENTWISE_MODULES:
    register_rule(_m, elementwise)

def _CONV_ATTRS(mod: nn.Module) -> tuple:
    if mod.groups == 1:
        return (("out_channels", "weight", 0), ("in_channels", "weight", 1))
    return (("out_channels", "weight", 0), ("groups", "weight", 0), ("in_channels", "weight", 0))
_NORM_ATTRS = (("num_features", "weight", 0), ("num_features", "running_mean", 0))

# Layers: one rule per op serves the module and the function form (parameter operands
# are get_attr nodes); modules get `sync`, functions `fix_literals` for sizes they encode.
for _c in (nn.Conv1d, nn.Conv2d, nn.Conv3d):  # out = new space; in = weight columns
    register_rule(_c, couple_conv, sync_conv, attrs=_CONV_ATTRS)
for _f in (F.conv1d, F.conv2d, F.conv3d):
    register_rule(_f, couple_conv, fix_literals=fix_conv_groups)
for _c in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_c, couple_conv_transpose, sync_conv_transpose,
                  attrs=(("in_channels", "weight", 0), ("out_channels", "weight", 1)))
for _f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    register_rule(_f, couple_conv_transpose)
register_rule(nn.Linear, couple_linear, sync_linear,
              attrs=(("out_features", "weight", 0), ("in_features", "weight", 1)))  # last dim: in -> new out
register_rule(F.linear, couple_linear)
register_rule(torch.addmm, couple_addmm)  # bias + x @ W: a Linear with W stored (in, out)
for _c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    register_rule(_c, couple_batchnorm, sync_batchnorm, attrs=_NORM_ATTRS)  # per-channel affine, stats
register_rule(F.batch_norm, couple_batchnorm)
for _c in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_rule(_c, couple_instancenorm, sync_batchnorm, attrs=_NORM_ATTRS)
register_rule(F.instance_norm, couple_instancenorm)
register_rule(nn.LayerNorm, couple_layernorm, sync_layernorm, attrs=(("normalized_shape", "weight", 0),))  # stat over last dim
register_rule(F.layer_norm, couple_layernorm, fix_literals=fix_layer_norm_fn)
register_rule(nn.GroupNorm, couple_groupnorm, sync_groupnorm,
              attrs=(("num_channels", "weight", 0), ("num_groups", "weight", 0)))  # whole groups
register_rule(F.group_norm, couple_groupnorm, fix_literals=fix_group_norm_fn)
for _c in (nn.Softmax, nn.LogSoftmax, nn.LocalResponseNorm, nn.CrossMapLRN2d):
    register_rule(_c, couple_stat_dim)  # shape-preserving statistic over one dim
register_rule(nn.PReLU, couple_prelu, sync_prelu, attrs=(("num_parameters", "weight", 0),))
register_rule(F.prelu, couple_prelu)
register_rule(nn.Embedding, couple_embedding, sync_embedding, attrs=(("embedding_dim", "weight", 1),))
register_rule(F.embedding, couple_embedding)
register_rule(nn.MultiheadAttention, couple_mha, sync_mha,
              attrs=(("embed_dim", "in_proj_weight", 1), ("num_heads", "in_proj_weight", 1)))  # whole heads
_POOLS_AND_PADS = {
    1: (nn.MaxPool1d, nn.AvgPool1d, nn.LPPool1d, nn.ConstantPad1d, nn.ZeroPad1d, nn.ReflectionPad1d,
        nn.ReplicationPad1d, F.max_pool1d, F.avg_pool1d, F.lp_pool1d),
    2: (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d, nn.ConstantPad2d, nn.ZeroPad2d, nn.ReflectionPad2d,
        nn.ReplicationPad2d, F.max_pool2d, F.avg_pool2d, F.lp_pool2d),
    3: (nn.MaxPool3d, nn.AvgPool3d, nn.LPPool3d, nn.ConstantPad3d, nn.ZeroPad3d, nn.ReflectionPad3d,
        nn.ReplicationPad3d, F.max_pool3d, F.avg_pool3d, F.lp_pool3d),
}
for _n, _ks in _POOLS_AND_PADS.items():
    for _k in _ks:  # channels pass through, spatial dims are new
        register_rule(_k, _pool(_n))
for _k in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
           nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
           F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
           F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):
    register_rule(_k, couple_adaptive_pool)
for _c in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    register_rule(_c, couple_interpolate)
register_rule(nn.PixelShuffle, couple_pixel_shuffle)  # c <- c*r^2 .. (c+1)*r^2
register_rule(nn.PixelUnshuffle, couple_pixel_unshuffle)
register_rule(nn.ChannelShuffle, couple_channel_shuffle)  # out[j*g+i] = in[i*cpg+j]
register_rule(nn.Flatten, couple_reshape)  # strided merge
register_rule(nn.Unflatten, couple_reshape)

register_rule(F.interpolate, couple_interpolate)
register_rule(F.pad, couple_pad)
for _k in (torch.roll, "method:roll"):
    register_rule(_k, couple_roll)  # rolled dims stay whole, the others pass through
register_rule(F.pixel_shuffle, couple_pixel_shuffle)
register_rule(F.pixel_unshuffle, couple_pixel_unshuffle)
register_rule(torch.pixel_shuffle, couple_pixel_shuffle)
register_rule(torch.channel_shuffle, couple_channel_shuffle)
register_rule(F.softmax, couple_stat_dim)
register_rule(F.log_softmax, couple_stat_dim)
register_rule(torch.softmax, couple_stat_dim)
register_rule("method:softmax", couple_stat_dim)
register_rule("method:log_softmax", couple_stat_dim)
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
    fix_group_norm_fn: literal_dims_group_norm,
    fix_conv_groups: literal_dims_conv,
    fix_window_attention: literal_dims_window_attention,
}


def _register_torchvision() -> None:
    """torchvision's wrapped ops: identities on channels, and Swin's window attention."""
    try:
        from torchvision.ops import stochastic_depth
        from torchvision.ops.misc import Permute
    except ImportError:  # torchvision is optional
        return
    register_rule(stochastic_depth, same_as_input)  # drops whole samples or rows, never channels
    register_rule(Permute, couple_permute)
    from torchvision.ops import MultiScaleRoIAlign

    register_rule(MultiScaleRoIAlign, couple_multiscale_roi_align)  # RoIAlign per channel (detectors)
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:  # pragma: no cover - older torchvision
        return
    FUNCTION_ARGS[swin.shifted_window_attention] = (
        "input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
        "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
    register_rule(swin.shifted_window_attention, couple_window_attention,
                  fix_literals=fix_window_attention)  # whole heads; num_heads follows C
    register_rule(swin._get_relative_position_bias, couple_relative_position_bias)  # table columns = heads
    register_rule(swin._patch_merging_pad, couple_patch_merging_pad)  # out[k*C + c] = in[c], k < 4


_register_torchvision()
