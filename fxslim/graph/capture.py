"""The second capture: run the model under torch.export (non-strict) and translate the
ATen graph it records into the torch-level forms the one rule table knows.

torch.fx symbolic tracing cannot follow ``**kwargs`` wrappers, Python control flow on
values or proxies that get iterated (Hugging Face transformers 5, detectors).
``torch.export.export(..., strict=False)`` runs the code on the example inputs and
records every op as ATen, with the user's parameter names kept on the ``get_attr``
nodes and the module path of every op in ``meta["nn_module_stack"]``.

The rule table is written once per op (DESIGN.md), so the ATen ops are not given rules
of their own: `ATEN_OPS` maps each ATen overload to the torch-level call the table
already knows (``aten.linear.default(x, w, b)`` -> ``F.linear(x, w, b)``,
``aten.view.default(x, size)`` -> ``x.view(size)``, ``aten.embedding.default(w, idx)`` ->
``F.embedding(idx, w)`` ...), one line per op. A translation applies only when every
argument it does not pass is at its ATen default (an ``add`` with ``alpha=2`` stays
ATen); an op with no translation stays as it is and the analysis pins what it touches,
naming the op and the module path. Shape checks (``_assert_tensor_metadata``) and
aliases are dropped.

The captured graph is specialised to the example's shapes (sizes are literals): the
GraphModule, and any pruned one made from it, runs only on inputs of those shapes, and
says so with a `TraceError` at call time (`check_input_shapes`, the graph's first op).
Its train/eval behaviour (dropout) is the one the model had when captured.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim._inputs import ExampleInputs
from fxslim.errors import TraceError
from fxslim.graph.rules.base import SHAPE_QUERIES

__all__ = ["ATEN_OPS", "Translation", "capture_export", "check_input_shapes", "is_transformers_model",
           "translate"]

logger = logging.getLogger(__name__)
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


def _bind(node: fx.Node) -> dict[str, Any]:
    names = [a.name for a in node.target._schema.arguments]
    return dict(zip(names, node.args)) | dict(node.kwargs)


def _at_default(value: Any, arg: Any) -> bool:
    if not arg.has_default_value():
        return False
    d = arg.default_value
    return value == d or (isinstance(value, (list, tuple)) and list(value) == list(d or []))


def _translated(node: fx.Node, tr: Translation) -> tuple[str, Any, tuple, dict] | None:
    """(op, target, args, kwargs) of the torch-level call, or None when an argument the
    translation does not pass is off its default."""
    bound = _bind(node)
    used = set(tr.args) | set(tr.kwargs) | set(tr.free)
    if tr.adapt is not None:
        used |= set(bound) - set(tr.free)  # the adapter reads what it needs
    for arg in node.target._schema.arguments:
        if arg.name in bound and arg.name not in used and not _at_default(bound[arg.name], arg):
            return None
    if tr.adapt is not None:
        args, kwargs = tr.adapt(bound, node)
    else:
        schema = {a.name: a for a in node.target._schema.arguments}
        args = [bound[n] if n in bound else schema[n].default_value for n in tr.args]
        while args and tr.args[len(args) - 1] not in bound:  # trailing defaults: leave them out
            args.pop()
        kwargs = {n: bound[n] for n in tr.kwargs if n in bound and not _at_default(bound[n], schema[n])}
    kwargs = {**kwargs, **dict(tr.const)}
    if isinstance(tr.target, str):
        return "call_method", tr.target.split(":", 1)[1], tuple(args), kwargs
    return "call_function", tr.target, tuple(args), kwargs


def translate(graph: fx.Graph) -> dict[str, int]:
    """Rewrite an exported graph's ATen nodes in place into torch-level calls.

    Returns:
        counts: {"translated": n, "dropped": n, "kept": n} plus one entry per kept ATen
        op ("aten:<name>") so that callers can report what stays untranslated.
    """
    counts: dict[str, int] = {"translated": 0, "dropped": 0, "kept": 0}
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target in DROPPED:
            if node.args and isinstance(node.args[0], fx.Node) and node.users:
                node.replace_all_uses_with(node.args[0])
            if not node.users:
                graph.erase_node(node)
                counts["dropped"] += 1
            continue
        tr = ATEN_OPS.get(node.target)
        new = _translated(node, tr) if tr is not None else None
        if new is None:
            counts["kept"] += 1
            key = f"aten:{node.target}"
            counts[key] = counts.get(key, 0) + 1
            continue
        node.op, node.target, node.args, node.kwargs = new
        counts["translated"] += 1
    return counts


def _one_name_per_tensor(root: nn.Module, graph: fx.Graph) -> None:
    """Tied weights (GPT-2's lm_head and wte) reach the graph under each of their names:
    every use reads the first name, so the analysis sees one tensor and slices it once."""
    first: dict[int, str] = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        t = root
        for part in node.target.split("."):
            t = getattr(t, part)
        node.target = first.setdefault(id(t), node.target)


def check_input_shapes(names: tuple, specs: tuple, *values: Any) -> None:
    """The captured graph's first op: its inputs must have the shapes it was captured with."""
    for name, spec, v in zip(names, specs, values):
        if spec is None:
            continue
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else None
        if shape != tuple(spec):
            raise TraceError(
                f"this model was captured by torch.export for input '{name}' of shape {tuple(spec)}, "
                f"and its sizes are fixed in the graph; got {shape if shape is not None else type(v).__name__}. "
                f"Capture (and prune) again with example inputs of the shapes you will run."
            )


SHAPE_QUERIES.add(check_input_shapes)  # asserts: no channels involved


def is_transformers_model(model: nn.Module) -> bool:
    """True for a Hugging Face transformers PreTrainedModel (without importing transformers)."""
    return any(t.__name__ == "PreTrainedModel" and t.__module__.startswith("transformers")
               for t in type(model).__mro__)


@contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """A transformers model returns its key/value cache (a DynamicCache, which export
    cannot return) unless ``config.use_cache`` is False: off while capturing, restored after."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old:
        config.use_cache = False
    try:
        yield
    finally:
        if old:
            config.use_cache = old


def capture_export(model: nn.Module, inputs: ExampleInputs) -> fx.GraphModule:
    """Capture `model` on `inputs` with torch.export (non-strict) and translate its ops.

    The GraphModule shares the model's parameter tensors (callers copy what they must);
    its ``get_attr`` targets are the model's own parameter names, its input and output
    handling are the model's (keyword inputs, a ``ModelOutput`` back).

    Raises:
        TraceError: torch.export cannot run the model on these inputs.
    """
    try:
        with _no_kv_cache(model):
            ep = torch.export.export(model, inputs.args, kwargs=inputs.kwargs, strict=False)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TraceError(f"torch.export cannot capture {type(model).__name__} on inputs {inputs.describe()} "
                         f"({type(exc).__name__}: {first[:300]}{' ...' if len(first) > 300 else ''})") from exc
    exported = ep.module()
    graph = exported.graph
    for node in list(graph.nodes):  # export's own guards: replaced by one clear shape check
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    _one_name_per_tensor(exported, graph)
    counts = translate(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    specs = tuple(tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None
                  for n in placeholders)
    with graph.inserting_after(placeholders[-1] if placeholders else next(iter(graph.nodes))):
        graph.call_function(check_input_shapes, (tuple(n.target for n in placeholders), specs, *placeholders))
    for node in graph.nodes:  # fake tensors are heavy and die with export's fake mode
        for key in ("val", "tensor_meta", "example_value", "unbacked_bindings"):
            node.meta.pop(key, None)
    kept = {k[5:]: v for k, v in counts.items() if k.startswith("aten:")}
    logger.info("torch.export capture: %d ops translated, %d dropped, %d kept as ATen %s",
                counts["translated"], counts["dropped"], counts["kept"], kept)
    from fxslim.graph.trace import _graph_module  # a plain GraphModule: export's hooks stay behind

    gm = _graph_module(exported, graph, type(model).__name__)
    gm.meta["fxslim_capture"] = {"kind": "export", "aten_kept": kept, "input_shapes": dict(
        zip((n.target for n in placeholders), specs))}
    return gm
