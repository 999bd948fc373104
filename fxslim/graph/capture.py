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
It records the eval-mode forward whatever the model's mode (the mode is a literal in an
ATen graph: dropout's ``train`` flag, batch_norm's ``training``); ``gm.train()`` does not
turn dropout back on. Train the pruned model through its own class (the class-keeping
rewrite) where that matters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from fxslim._inputs import ExampleInputs
from fxslim.errors import TraceError
from fxslim.graph._aten import ATEN_OPS, DROPPED, Translation
from fxslim.graph.rules.base import SHAPE_QUERIES

__all__ = ["ATEN_OPS", "DROPPED", "Translation", "capture_export", "check_input_shapes", "is_transformers_model", "no_kv_cache",
           "translate"]

logger = logging.getLogger(__name__)
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
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode while capturing, every module's own flag restored after."""
    training = [m for m in model.modules() if m.training]
    model.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


@contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
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
        with no_kv_cache(model), _eval_mode(model):
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
    gm.meta["fxslim_capture"] = {"kind": "export", "mode": "eval", "aten_kept": kept, "input_shapes": dict(
        zip((n.target for n in placeholders), specs))}
    return gm
