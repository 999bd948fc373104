"""Shape propagation: `tensor_meta` (shape, dtype) on every node, without real compute.

Meta device first, by formula where a layer or function has one (fx.Interpreter's
per-node cost avoided), then fake tensors, then one real forward as the last resort.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from fxslim.errors import TraceError

__all__ = ["node_shapes", "propagate_shapes"]

logger = logging.getLogger(__name__)


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Write `tensor_meta` on every node: meta tensors first, then fake tensors, then a real run.

    Runs in eval mode (so BatchNorm statistics are never updated) and restores the mode.
    """
    training = [m for m in gm.modules() if m.training]
    for m in training:  # not gm.eval(): only the flags that change, and back
        m.training = False
    try:
        _propagate(gm, inputs)
    finally:
        for m in training:
            m.training = True


_SHAPE_KEEPING = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.LeakyReLU, nn.Mish,
)


class _MetaProp(fx.Interpreter):
    """torch.fx ShapeProp without its deep copy: parameters become fake on the fly.

    Common layers (norms, activations, Linear, Conv) are not run (fake kernels cost
    milliseconds each): their output shape comes from a formula, after a check that the
    channel counts agree.
    """

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result)
        return result

    @staticmethod
    def _formula(target: str, mod: nn.Module, args: Any, kwargs: Any) -> torch.Tensor | None:
        """An empty output (same device as the input) when the layer has a shape formula."""
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and not kwargs and len(args) == 1:
            shape = _fast_shape(target, mod, x)
            if shape is not None:
                return x.new_empty(shape)
        return None

    def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
        out = self._formula(target, self.fetch_attr(target), args, kwargs)
        return out if out is not None else super().call_module(target, args, kwargs)


class _Shaped:
    """A tensor known only by shape and dtype: the output of a shape formula.

    Turned into a meta tensor only when an op without a formula reads it.
    """

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype

    def dim(self) -> int:
        return len(self.shape)

    def materialize(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def tensor_meta(self) -> TensorMetadata:
        stride, acc = [], 1
        for size in reversed(self.shape):
            stride.append(acc)
            acc *= max(size, 1)
        return TensorMetadata(torch.Size(self.shape), self.dtype, False, tuple(reversed(stride)),
                              torch.contiguous_format, False, {})


_F = nn.functional
_ADAPTIVE_FN = {_F.adaptive_avg_pool1d: 1, _F.adaptive_avg_pool2d: 2, _F.adaptive_avg_pool3d: 3,
                _F.adaptive_max_pool1d: 1, _F.adaptive_max_pool2d: 2, _F.adaptive_max_pool3d: 3}
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
_UNARY = {
    torch.relu, nn.functional.relu, nn.functional.relu6, nn.functional.gelu, nn.functional.silu,
    nn.functional.hardswish, nn.functional.hardsigmoid, torch.sigmoid, torch.tanh, nn.functional.dropout,
}


def _function_shape(fn: Any, args: tuple, kwargs: dict) -> _Shaped | None:
    """Output of common shape-keeping functions by formula; None when there is none."""
    if not args:
        return None
    if fn is torch.cat:
        return _cat_shape(args, kwargs)
    x = args[0]
    if not isinstance(x, (_Shaped, torch.Tensor)):
        return None
    if fn in _UNARY:
        return _Shaped(x.shape, x.dtype)
    if fn in _ADAPTIVE_FN:
        return _adaptive_fn_shape(fn, x, args, kwargs)
    if fn is torch.flatten:
        return _flatten_shape(x, args, kwargs)
    if fn in _BINARY and len(args) == 2 and not kwargs:
        y = args[1]
        if isinstance(y, (_Shaped, torch.Tensor)):
            if tuple(y.shape) == tuple(x.shape) and y.dtype == x.dtype:
                return _Shaped(x.shape, x.dtype)
        elif type(y) in (int, float) and x.dtype.is_floating_point:
            return _Shaped(x.shape, x.dtype)
        return None
    return None


def _adaptive_fn_shape(fn: Any, x: Any, args: tuple, kwargs: dict) -> _Shaped | None:
    """F.adaptive_{avg,max}_pool{1,2,3}d(x, output_size) (max pools without indices)."""
    if len(args) > 2 or set(kwargs) - {"output_size", "return_indices"} or kwargs.get("return_indices"):
        return None
    size = args[1] if len(args) == 2 else kwargs.get("output_size")
    shape = _adaptive_shape(tuple(x.shape), size, _ADAPTIVE_FN[fn])
    return None if shape is None else _Shaped(shape, x.dtype)


def _flatten_shape(x: Any, args: tuple, kwargs: dict) -> _Shaped | None:
    """torch.flatten(x, start_dim=0, end_dim=-1)."""
    names = ("start_dim", "end_dim")
    if len(args) > 3 or set(kwargs) - set(names[len(args) - 1:]):
        return None
    dims = dict(zip(names, args[1:])) | kwargs
    rank = max(x.dim(), 1)
    start, end = dims.get("start_dim", 0), dims.get("end_dim", -1)
    if type(start) is not int or type(end) is not int or not (-rank <= start < rank and -rank <= end < rank):
        return None
    start, end = start % rank, end % rank
    if x.dim() == 0 or start > end:
        return None  # let torch decide (or raise)
    n = 1
    for s in x.shape[start:end + 1]:
        n *= s
    return _Shaped((*x.shape[:start], n, *x.shape[end + 1:]), x.dtype)


def _cat_shape(args: tuple, kwargs: dict) -> _Shaped | None:
    parts = args[0]
    dim = args[1] if len(args) == 2 else kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or len(args) > 2 or set(kwargs) - {"dim"} or not parts:
        return None
    if not all(isinstance(p, (_Shaped, torch.Tensor)) for p in parts) or len({p.dtype for p in parts}) != 1:
        return None
    shapes = [tuple(p.shape) for p in parts]
    rank = len(shapes[0])
    if not isinstance(dim, int) or not -rank <= dim < rank:
        return None
    dim %= rank
    rest = shapes[0][:dim] + shapes[0][dim + 1:]
    if any(len(sh) != rank or sh[:dim] + sh[dim + 1:] != rest for sh in shapes):
        return None  # let torch raise its own error
    out = list(shapes[0])
    out[dim] = sum(sh[dim] for sh in shapes)
    return _Shaped(tuple(out), parts[0].dtype)


def _mha_shape(mod: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple | None:
    """(attention output, weights or None) of nn.MultiheadAttention, after its size checks."""
    known = {"key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"}
    if len(args) != 3 or set(kwargs) - known or not all(isinstance(a, (_Shaped, torch.Tensor)) for a in args):
        return None
    q, k, v = args
    if q.dim() not in (2, 3) or k.dim() != q.dim() or v.dim() != q.dim():
        return None
    e = mod.embed_dim
    ok = q.shape[-1] == e and k.shape[-1] == mod.kdim and v.shape[-1] == mod.vdim and e % mod.num_heads == 0
    if mod._qkv_same_embed_dim:
        ok = ok and tuple(mod.in_proj_weight.shape) == (3 * e, e)
    ok = ok and tuple(mod.out_proj.weight.shape) == (e, e)
    if not ok:
        raise TraceError(f"MultiheadAttention (embed_dim {e}, {mod.num_heads} heads) gets query/key/value of "
                         f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    out = _Shaped(q.shape, q.dtype)
    if not kwargs.get("need_weights", True):
        return out, None
    if q.dim() == 2:
        tgt, src, batch = q.shape[0], k.shape[0], ()
    elif mod.batch_first:
        tgt, src, batch = q.shape[1], k.shape[1], (q.shape[0],)
    else:
        tgt, src, batch = q.shape[0], k.shape[0], (q.shape[1],)
    heads = () if kwargs.get("average_attn_weights", True) else (mod.num_heads,)
    return out, _Shaped((*batch, *heads, tgt, src), q.dtype)


def _materialize(obj: Any) -> Any:
    return fx.node.map_aggregate(obj, lambda v: v.materialize() if isinstance(v, _Shaped) else v)


def _record(n: fx.Node, result: Any) -> None:
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, _Shaped):
            found = True
            return obj.tensor_meta()
        if isinstance(obj, torch.Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    meta = fx.node.map_aggregate(result, extract)
    if found:
        n.meta["tensor_meta"] = meta
    else:
        n.meta.pop("tensor_meta", None)
    n.meta["type"] = torch.Tensor if isinstance(result, _Shaped) else type(result)


def _meta_device_run(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Shapes on the meta device, without fx.Interpreter's per-node cost.

    Common layers and shape-keeping functions get their output shape from a formula
    (after checking channel counts) and never become tensors; other ops run on meta
    tensors, with meta twins of the parameters they read. Any op without a meta kernel
    raises, and the fake-tensor run takes over.
    """
    env: dict[fx.Node, Any] = {}
    modules = dict(gm.named_modules())
    pending = iter(inputs)

    def load(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            val = next(pending, None)
            if val is None:
                val = n.args[0] if n.args else None
            elif isinstance(val, torch.Tensor):
                val = torch.empty_like(val, device="meta")
        elif n.op == "get_attr":
            val = gm
            for part in n.target.split("."):
                val = getattr(val, part)
            if isinstance(val, torch.Tensor):
                val = torch.empty_like(val, device="meta")
        elif n.op == "output":
            _record(n, load(n.args[0]))
            return
        else:
            args, kwargs = load(n.args), load(n.kwargs)
            if "device" in kwargs:  # a device written in the graph (torch.export): build on meta
                kwargs = {**kwargs, "device": "meta"}
            if n.op == "call_method" and n.target == "to":  # stay on meta: drop device moves
                args = tuple(a for a in args if not isinstance(a, (torch.device, str)))
            val = None
            if n.op == "call_module":
                mod = modules[n.target]
                if isinstance(mod, nn.MultiheadAttention):
                    val = _mha_shape(mod, args, kwargs)
                elif len(args) == 1 and not kwargs and isinstance(args[0], (_Shaped, torch.Tensor)):
                    shape = _fast_shape(n.target, mod, args[0])
                    val = None if shape is None else _Shaped(shape, args[0].dtype)
                if val is None:
                    twins = {k: torch.empty_like(v, device="meta") for k, v in
                             list(mod.named_parameters()) + list(mod.named_buffers())}
                    val = torch.func.functional_call(mod, twins, _materialize(args), _materialize(kwargs))
            elif n.op == "call_function":
                val = _function_shape(n.target, args, kwargs)
                if val is None:
                    val = n.target(*_materialize(args), **_materialize(kwargs))
            else:  # call_method
                self_obj, *rest = _materialize(args)
                val = getattr(self_obj, n.target)(*rest, **_materialize(kwargs))
        env[n] = val
        _record(n, val)


def _fast_shape(target: str, mod: nn.Module, x: torch.Tensor) -> tuple[int, ...] | None:
    """Output shape of common layers by formula, after checking their channel counts."""
    t = type(mod)
    if t in _SHAPE_KEEPING:
        return tuple(x.shape)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        _expect(target, x.dim() >= 2 and x.shape[1] == mod.num_features, mod.num_features, x)
        return tuple(x.shape)
    if t is nn.LayerNorm:
        ns = tuple(mod.normalized_shape)
        _expect(target, tuple(x.shape[-len(ns):]) == ns, ns, x)
        if mod.weight is not None:
            _expect(target, tuple(mod.weight.shape) == ns, ns, x)
        return tuple(x.shape)
    if t is nn.Linear:
        _expect(target, x.dim() >= 1 and x.shape[-1] == mod.in_features == mod.weight.shape[1], mod.in_features, x)
        return (*x.shape[:-1], mod.weight.shape[0])
    if t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and isinstance(mod.padding, tuple) and mod.padding_mode == "zeros":
        nsp = mod.weight.dim() - 2
        if x.dim() != nsp + 2:
            return None
        w = mod.weight
        _expect(target, x.shape[1] == w.shape[1] * mod.groups == mod.in_channels, mod.in_channels, x)
        _expect(target, w.shape[0] % mod.groups == 0, mod.out_channels, x)
        sp = [
            (x.shape[2 + i] + 2 * mod.padding[i] - mod.dilation[i] * (mod.kernel_size[i] - 1) - 1)
            // mod.stride[i] + 1
            for i in range(nsp)
        ]
        return (x.shape[0], w.shape[0], *sp)
    if isinstance(mod, _POOLS) and not mod.ceil_mode and not getattr(mod, "return_indices", False):
        nsp = int(type(mod).__name__[-2])
        if x.dim() != nsp + 2:
            return None
        def tup(v: Any) -> tuple[int, ...]:
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nsp
        k, st, p = tup(mod.kernel_size), tup(mod.stride or mod.kernel_size), tup(mod.padding)
        d = tup(getattr(mod, "dilation", 1))
        sp = [(x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(nsp)]
        return (*x.shape[:2], *sp)
    if isinstance(mod, _ADAPTIVE) and not getattr(mod, "return_indices", False):
        return _adaptive_shape(tuple(x.shape), mod.output_size, int(type(mod).__name__[-2]))
    return None


def _adaptive_shape(shape: tuple[int, ...], size: Any, nsp: int) -> tuple[int, ...] | None:
    """Output shape of an adaptive pool over `nsp` trailing dims (batched or not); None
    entries of `size` keep the input's size."""
    if isinstance(size, int):
        size = (size,) * nsp
    if not isinstance(size, (tuple, list)) or len(size) != nsp or len(shape) not in (nsp + 1, nsp + 2):
        return None
    if not all(s is None or (type(s) is int and s > 0) for s in size):
        return None
    lead = len(shape) - nsp
    return (*shape[:lead], *(shape[lead + i] if s is None else s for i, s in enumerate(size)))


_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _expect(target: str, ok: bool, want: Any, x: torch.Tensor) -> None:
    if not ok:
        raise TraceError(f"'{target}' expects {want} channels but gets a tensor of shape {tuple(x.shape)}")



def _propagate(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    try:
        metas = [torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t for t in inputs]
        with torch.no_grad():
            _meta_device_run(gm, metas)
        return
    except TraceError as exc:  # a channel count disagrees: no other run would do better
        raise TraceError(f"the traced model does not run on the example inputs: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - an op without a meta kernel: fake tensors next
        logger.info("meta shape propagation failed (%s); trying fake tensors", exc)
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
            with torch.no_grad():
                _MetaProp(gm).run(*fake_inputs)
        return
    except Exception as exc:  # noqa: BLE001 - fake kernels are missing for some ops: a real run next
        logger.info("fake shape propagation failed (%s); running one real forward", exc)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise TraceError(
            f"the traced model does not run on the example inputs: {type(exc).__name__}: {exc}"
        ) from exc


def node_shapes(node: fx.Node) -> Any:
    """Shape(s) of a node's output: a tuple of ints, a (nested) list of them, or None."""
    tm = node.meta.get("tensor_meta")
    return _shapes_of(tm)


def _shapes_of(tm: Any) -> Any:
    if tm is None:
        return None
    if isinstance(tm, TensorMetadata):
        return tuple(int(s) for s in tm.shape)
    if isinstance(tm, (list, tuple)):
        return [_shapes_of(t) for t in tm]
    if isinstance(tm, dict):
        return None
    return None
