"""ATen -> torch-level translations for the torch.export capture: one line per op.

Each entry writes an ATen overload as the call the one rule table already knows
(``aten.linear.default(x, w, b)`` -> ``F.linear(x, w, b)``); `fxslim.graph.capture`
applies them. A translation applies only when every ATen argument it does not pass is at
its default. Adding support for an op the capture yields is adding a line here (and a
rule in the table when the torch-level form has none).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["ATEN_OPS", "DROPPED", "Translation"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Translation:
    """How one ATen overload is written as a torch-level call.

    Attributes:
        target: the function, or ``"method:<name>"`` for a tensor method.
        args: ATen argument names passed positionally, in the target's order.
        kwargs: ATen argument names passed by keyword (when not at their default).
        free: ATen arguments that do not change the forward's values (layout, pin_memory).
        adapt: ``adapt(bound, node) -> (args, kwargs)`` where the forms differ beyond order.
        const: keywords the target takes with fixed values (``inplace=True`` for ``aten.silu_``).
    """

    target: Any
    args: tuple[str, ...] = ("self",)
    kwargs: tuple[str, ...] = ()
    free: tuple[str, ...] = ()
    adapt: Callable | None = None
    const: tuple[tuple[str, Any], ...] = ()


def _index_of(node: fx.Node, dim: int, index: Any) -> tuple:
    ndim = node.meta["val"].dim() if "val" in node.meta else None
    if dim < 0:
        if ndim is None:
            return (Ellipsis, index) + (slice(None),) * (-dim - 1)
        dim += ndim
    return (slice(None),) * dim + (index,)


def _slice(a: dict, node: fx.Node) -> tuple:
    """x[..., start:end:step] on dim (an end past any size is open)."""
    end = a.get("end")
    end = None if end is not None and end >= 1 << 62 else end
    step = a.get("step", 1)
    index = slice(a.get("start"), end, None if step == 1 else step)
    return (a["self"], _index_of(a["self"], a.get("dim", 0), index)), {}


def _select(a: dict, node: fx.Node) -> tuple:
    """x[..., index] on dim."""
    return (a["self"], _index_of(a["self"], a["dim"], a["index"])), {}


def _embedding(a: dict, node: fx.Node) -> tuple:
    """F.embedding(indices, weight), with the padding row (it only changes gradients)."""
    pad = a.get("padding_idx", -1)
    return (a["indices"], a["weight"]), ({} if pad == -1 else {"padding_idx": pad})


_T = Translation
_BINARY = ("self", "other")
_TO = ("non_blocking",)
_INPLACE = (("inplace", True),)
# one line per op: ATen overload -> the torch-level form the rule table knows
ATEN_OPS: dict[Any, Translation] = {
    aten.linear.default: _T(F.linear, ("input", "weight", "bias")),
    aten.addmm.default: _T(torch.addmm, ("self", "mat1", "mat2")),  # bias + x @ W (GPT-2's Conv1D)
    aten.embedding.default: _T(F.embedding, adapt=_embedding, free=("padding_idx",)),
    aten.conv1d.default: _T(F.conv1d, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    aten.conv2d.default: _T(F.conv2d, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    aten.conv3d.default: _T(F.conv3d, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    aten.batch_norm.default: _T(F.batch_norm, ("input", "running_mean", "running_var", "weight", "bias", "training",
                                               "momentum", "eps"), free=("cudnn_enabled",)),
    aten.layer_norm.default: _T(F.layer_norm, ("input", "normalized_shape", "weight", "bias", "eps"),
                                free=("cudnn_enable",)),
    aten.group_norm.default: _T(F.group_norm, ("input", "num_groups", "weight", "bias", "eps"),
                                free=("cudnn_enabled",)),
    aten.scaled_dot_product_attention.default: _T(
        F.scaled_dot_product_attention, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal"),
        kwargs=("scale", "enable_gqa")),
    aten.matmul.default: _T(torch.matmul, _BINARY),
    aten.bmm.default: _T(torch.bmm, ("self", "mat2")),
    aten.softmax.int: _T(torch.softmax, ("self", "dim"), kwargs=("dtype",)),
    aten.dropout.default: _T(F.dropout, ("input", "p", "train")),
    aten.add.Tensor: _T(operator.add, _BINARY),  # alpha must be 1
    aten.add.Scalar: _T(operator.add, _BINARY),
    aten.sub.Tensor: _T(operator.sub, _BINARY),
    aten.sub.Scalar: _T(operator.sub, _BINARY),
    aten.mul.Tensor: _T(operator.mul, _BINARY),
    aten.mul.Scalar: _T(operator.mul, _BINARY),
    aten.div.Tensor: _T(operator.truediv, _BINARY),
    aten.div.Scalar: _T(operator.truediv, _BINARY),
    aten.neg.default: _T(torch.neg),
    aten.pow.Tensor_Scalar: _T(torch.pow, ("self", "exponent")),
    aten.rsqrt.default: _T(torch.rsqrt),
    aten.sqrt.default: _T(torch.sqrt),
    aten.exp.default: _T(torch.exp),
    aten.abs.default: _T(torch.abs),
    aten.erf.default: _T(torch.erf),
    aten.tanh.default: _T(torch.tanh),
    aten.sigmoid.default: _T(torch.sigmoid),
    aten.relu.default: _T(torch.relu),
    aten.relu_.default: _T("method:relu_"),  # in place stays in place: later readers see the result
    aten.silu_.default: _T(F.silu, const=_INPLACE),
    aten.hardswish_.default: _T(F.hardswish, const=_INPLACE),
    aten.hardsigmoid_.default: _T(F.hardsigmoid, const=_INPLACE),
    aten.hardtanh_.default: _T(F.hardtanh, ("self", "min_val", "max_val"), const=_INPLACE),
    aten.dropout_.default: _T(F.dropout, ("self", "p", "train"), const=_INPLACE),
    aten.add_.Tensor: _T("method:add_", _BINARY),
    aten.mul_.Tensor: _T("method:mul_", _BINARY),
    aten.silu.default: _T(F.silu),
    aten.gelu.default: _T(F.gelu, kwargs=("approximate",)),
    aten.hardswish.default: _T(F.hardswish),
    aten.hardsigmoid.default: _T(F.hardsigmoid),
    aten.hardtanh.default: _T(F.hardtanh, ("self", "min_val", "max_val")),
    aten.clamp.default: _T(torch.clamp, ("self", "min", "max")),
    aten.where.self: _T(torch.where, ("condition", "self", "other")),
    aten.masked_fill.Scalar: _T("method:masked_fill", ("self", "mask", "value")),
    aten.masked_fill.Tensor: _T("method:masked_fill", ("self", "mask", "value")),
    aten.mean.dim: _T(torch.mean, ("self", "dim", "keepdim")),  # dtype must be None
    aten.sum.dim_IntList: _T(torch.sum, ("self", "dim", "keepdim")),
    aten.amax.default: _T(torch.amax, ("self", "dim", "keepdim")),
    aten.to.dtype: _T("method:to", ("self", "dtype"), free=_TO),
    aten.to.device: _T("method:to", ("self", "device", "dtype"), free=_TO),
    aten.to.dtype_layout: _T("method:to", kwargs=("dtype", "device"), free=("layout", "pin_memory", *_TO)),
    aten._to_copy.default: _T("method:to", kwargs=("dtype", "device"), free=("layout", "pin_memory", *_TO)),
    aten.type_as.default: _T("method:type_as", _BINARY),
    aten.clone.default: _T("method:clone", free=("memory_format",)),
    aten.contiguous.default: _T("method:contiguous", free=("memory_format",)),
    aten.view.default: _T("method:view", ("self", "size")),
    aten._unsafe_view.default: _T("method:view", ("self", "size")),
    aten.reshape.default: _T("method:reshape", ("self", "shape")),
    aten.expand.default: _T("method:expand", ("self", "size"), free=("implicit",)),
    aten.flatten.using_ints: _T(torch.flatten, ("self", "start_dim", "end_dim")),
    aten.unflatten.int: _T(torch.unflatten, ("self", "dim", "sizes")),
    aten.permute.default: _T(torch.permute, ("self", "dims")),
    aten.transpose.int: _T(torch.transpose, ("self", "dim0", "dim1")),
    aten.t.default: _T("method:t"),
    aten.unsqueeze.default: _T(torch.unsqueeze, ("self", "dim")),
    aten.squeeze.dim: _T(torch.squeeze, ("self", "dim")),
    aten.squeeze.dims: _T(torch.squeeze, ("self", "dim")),
    aten.squeeze.default: _T(torch.squeeze),
    aten.cat.default: _T(torch.cat, ("tensors", "dim")),
    aten.stack.default: _T(torch.stack, ("tensors", "dim")),
    aten.split.Tensor: _T(torch.split, ("self", "split_size", "dim")),
    aten.split_with_sizes.default: _T(torch.split, ("self", "split_sizes", "dim")),
    aten.chunk.default: _T(torch.chunk, ("self", "chunks", "dim")),
    aten.unbind.int: _T(torch.unbind, ("self", "dim")),
    aten.slice.Tensor: _T(operator.getitem, adapt=_slice),
    aten.select.int: _T(operator.getitem, adapt=_select),
    aten.adaptive_avg_pool2d.default: _T(F.adaptive_avg_pool2d, ("self", "output_size")),
    aten.max_pool2d.default: _T(F.max_pool2d, ("self", "kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    aten.avg_pool2d.default: _T(F.avg_pool2d, ("self", "kernel_size", "stride", "padding", "ceil_mode",
                                               "count_include_pad", "divisor_override")),
}
# ops that compute nothing the forward needs: value aliases (uses read the input) and
# metadata asserts that export records (dtype/device checks; shapes are checked up front)
DROPPED = {
    aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten._assert_tensor_metadata.default, aten._assert_scalar.default,
}
