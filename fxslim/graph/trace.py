"""Tracing: torch.fx symbolic trace plus shape/dtype metadata on every node.

Shapes are propagated with fake tensors (no real compute, no real memory); if the fake
run fails (an op without a fake kernel), fxslim falls back to one real forward pass.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import traceback
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

import fxslim as fxslim_pkg
from fxslim._args import check_module, choice, module_paths
from fxslim._inputs import ExampleInputs, as_inputs
from fxslim.errors import ArgumentError, TraceError
from fxslim.graph._guards import (
    copy_gradient_hooks,
    hooked_modules,
    recording_semantics,
    restore_mutated_buffers,
    snapshot_buffers,
)
from fxslim.graph.capture import capture_export, is_transformers_model
from fxslim.graph.run_capture import SPECIALISED, UNUSED, capture_run
from fxslim.graph.shapes import node_shapes, propagate_shapes
from fxslim.utils import fxslim_meta, gc_paused

__all__ = [
    "CAPTURES",
    "TRACE_OPTIONS",
    "FxslimTracer",
    "as_input_tuple",
    "compile_now",
    "copy_structure",
    "fingerprint",
    "node_shapes",
    "propagate_shapes",
    "trace",
]

logger = logging.getLogger(__name__)


def as_input_tuple(example_inputs: Any) -> tuple:
    """Positional example inputs as a tuple (kept for callers that take no keywords);
    entry points use `fxslim._inputs.as_inputs`."""
    inputs = as_inputs(example_inputs)
    if inputs.kwargs:
        raise TraceError(f"keyword inputs {sorted(inputs.kwargs)} where only positional ones are accepted")
    return inputs.args


class FxslimTracer(fx.Tracer):
    """A torch.fx tracer that remembers which module it was in when tracing failed.

    Args:
        leaf_modules: module types (beyond torch.nn's own) to keep as single call_module
            nodes instead of tracing through them.
        leaf_paths: qualified module names to keep as leaves.
    """

    def __init__(
        self,
        leaf_modules: Iterable[type] = (),
        leaf_paths: Iterable[str] = (),
        autowrap_functions: Iterable = (),
    ):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_modules = tuple(leaf_modules)
        self.leaf_paths = set(leaf_paths)
        self.path_stack: list[str] = []
        self.failed_path: str | None = None  # innermost module being traced when it failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_modules and isinstance(m, self.leaf_modules):
            return True
        if module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = path
            raise
        finally:
            self.path_stack.pop()


# frames of these packages are not the user's code (told apart by package folder, not by
# a substring of the path: the user's own code may well live under a folder named fxslim)
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, fxslim_pkg))


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch's and fxslim's code, as 'file:line in func'."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not os.path.abspath(fr.filename).startswith(_LIBRARY_DIRS):
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {fr.line}"
    return "<unknown location>"


@gc_paused
def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type] = (),
    leaf_paths: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap_functions: Iterable = (),
    capture: str = "auto",
    share_weights: bool = False,
) -> fx.GraphModule:
    """Capture `model` as a graph and record shape and dtype on every node.

    Two captures feed the same analysis (DESIGN.md): torch.fx symbolic tracing, and
    torch.export (non-strict), which runs the model on the example inputs and whose ATen
    ops are translated into the forms the rule table knows (`fxslim.graph.capture`). The
    export capture is specialised to the example's shapes: its GraphModule (and any
    pruned one made from it) runs on inputs of those shapes only and raises a
    `TraceError` for others; it records the eval-mode forward (dropout off) whatever the
    model's mode.

    The user's model is not modified: the returned GraphModule owns copies of its
    modules and (unless `share_weights`) of its parameters.

    Args:
        model: the model to trace (its train/eval mode is kept).
        example_inputs: what the model's forward takes: a tensor, a tuple of tensors, or a
            dict / transformers ``BatchEncoding`` of keyword inputs (``input_ids``,
            ``attention_mask``, ``pixel_values`` ...), or an `ExampleInputs`.
        leaf_modules: extra module types to keep whole (not traced through).
        leaf_paths: qualified names of modules to keep whole.
        concrete_args: passed to torch.fx to specialise Python control flow.
        autowrap_functions: free functions to record as single call_function nodes.
        capture: "fx" (torch.fx symbolic tracing), "export" (torch.export, non-strict),
            "run" (one eager run recorded, `fxslim.graph.run_capture`: for analysis only,
            specialised to the example inputs; pruning then slices the user's own classes)
            or "auto": export for a transformers PreTrainedModel, else fx, falling back to
            export when fx cannot trace the model (and no fx-only option was given), and to
            "run" when export fails too (logged). The choice is recorded in
            ``gm.meta["fxslim_capture"]["kind"]`` (for "run", with ``["specialised"]``).
        share_weights: reuse the model's parameter tensors instead of copying them (for
            passes that never write to them in place, such as pruning, which copies
            whatever it keeps).

    Returns:
        A GraphModule whose nodes carry `meta["tensor_meta"]`.

    Raises:
        TraceError: the model cannot be traced; the message names the module and line.

    Example:
        >>> gm = fxslim.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> gm = fxslim.trace(llama, tokenizer("def f(x):", return_tensors="pt"))  # export capture
    """
    check_module("model", model)
    inputs = as_inputs(example_inputs)
    choice("capture", capture, CAPTURES)
    specs = _input_specs(inputs)  # bad inputs fail here, before either capture
    leaf_paths = module_paths(model, leaf_paths, "leaf_paths")
    leaf_modules = tuple(leaf_modules) if isinstance(leaf_modules, Iterable) else leaf_modules
    if not isinstance(leaf_modules, tuple) or not all(isinstance(t, type) and issubclass(t, nn.Module)
                                                      for t in leaf_modules):
        raise ArgumentError(f"leaf_modules must be nn.Module subclasses (classes, not names), got {leaf_modules!r}")
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise ArgumentError(f"concrete_args must be a dict {{argument name: value}}, got {type(concrete_args).__name__}")
    fx_only = bool(leaf_paths or leaf_modules or concrete_args or tuple(autowrap_functions))
    if capture in ("export", "run") and fx_only:
        raise ArgumentError("leaf_modules, leaf_paths, concrete_args and autowrap_functions apply to "
                            "capture='fx' only")
    if isinstance(model, fx.GraphModule):
        gm = copy_structure(model) if share_weights else _deepcopy(model)
    elif capture == "export" or (capture == "auto" and not fx_only and is_transformers_model(model)):
        gm = _export(model, inputs, specs, share_weights)
    elif capture == "auto" and not fx_only:
        try:
            gm = _symbolic(model, specs, leaf_modules, leaf_paths, concrete_args, autowrap_functions,
                           share_weights)
        except _FxCannotTrace as fx_exc:  # not a refusal (hooks on the model): torch.fx's own limits
            logger.info("torch.fx cannot trace %s; capturing with torch.export: %s", type(model).__name__, fx_exc)
            try:
                gm = _export(model, inputs, specs, share_weights)
            except TraceError as exc:
                logger.warning("torch.fx and torch.export cannot capture %s (%s); recording one eager run "
                               "instead: %s", type(model).__name__, str(exc).splitlines()[0][:200], SPECIALISED)
                try:
                    gm = _run(model, inputs, specs, share_weights)
                except TraceError as run_exc:
                    raise TraceError(f"{fx_exc}\n  torch.export (tried next) failed as well: {exc}\n"
                                     f"  and so did running it: {run_exc}") from run_exc
    elif capture == "run":
        gm = _run(model, inputs, specs, share_weights)
    else:
        gm = _symbolic(model, specs, leaf_modules, leaf_paths, concrete_args, autowrap_functions, share_weights)
    if not isinstance(model, fx.GraphModule):
        # a model fxslim pruned into the user's classes: its source, inputs and history go on
        gm.meta.update({k: v for k, v in fxslim_meta(model).items() if k in _CARRIED})
    if gm.meta["fxslim_capture"]["kind"] != "run":  # a run capture records real shapes
        propagate_shapes(gm, inputs.flat(gm))
    return gm


class _FxCannotTrace(TraceError):
    """torch.fx symbolic tracing could not follow the code (capture="auto" tries export)."""


def _export(model: nn.Module, inputs: ExampleInputs, specs: list, share_weights: bool) -> fx.GraphModule:
    """The torch.export capture, with fxslim's metadata (see `fxslim.graph.capture`)."""
    gm = capture_export(model, inputs)
    if not share_weights:
        _own_tensors(gm)
    gm.training = model.training
    gm.meta["fxslim_opaque"] = {}
    gm.meta["fxslim_source"] = fingerprint(model, gm)
    gm.meta["fxslim_inputs"] = specs
    return gm


def _run(model: nn.Module, inputs: ExampleInputs, specs: list, share_weights: bool) -> fx.GraphModule:
    """The run capture (`fxslim.graph.run_capture`) of a copy of the user's tree."""
    root = copy_structure(model) if share_weights else _deepcopy(model)
    gm = capture_run(root, inputs)
    gm.training = model.training
    gm.meta["fxslim_opaque"] = {}
    gm.meta["fxslim_source"] = fingerprint(model, None)  # the recorded ops depend on the input's values
    gm.meta["fxslim_inputs"] = specs
    gm.meta["fxslim_capture"] = {"kind": "run", "specialised": SPECIALISED, "unused": gm.meta[UNUSED]}
    return gm


def _own_tensors(gm: fx.GraphModule) -> None:
    """Give `gm` copies of the tensors it shares with the model (tied ones stay tied)."""
    copies: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in copies:
                    c = t.detach().clone()
                    copies[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(t, nn.Parameter) else c
                table[name] = copies[id(t)]


def _symbolic(model: nn.Module, specs: list, leaf_modules: tuple, leaf_paths: list,
              concrete_args: dict | None, autowrap_functions: Iterable, share_weights: bool) -> fx.GraphModule:
    """The torch.fx capture."""
    root, graph, opaque = symbolic_graph(model, leaf_modules, leaf_paths, concrete_args, autowrap_functions,
                                         share_weights)
    name = type(model).__name__
    gm = _graph_module(root, graph, name)
    gm.training = model.training  # submodules are copies: each keeps its own mode
    gm.meta["fxslim_opaque"] = opaque
    gm.meta["fxslim_source"] = fingerprint(model, gm)
    gm.meta["fxslim_inputs"] = specs
    gm.meta["fxslim_capture"] = {"kind": "fx"}
    return gm


def symbolic_graph(model: nn.Module, leaf_modules: tuple = (), leaf_paths: Iterable[str] = (),
                   concrete_args: dict | None = None, autowrap_functions: Iterable = (),
                   share_weights: bool = True, shallow: bool = False) -> tuple[nn.Module, fx.Graph, dict[str, str]]:
    """torch.fx's graph of `model` as fxslim traces it: (the traced root copy, the graph,
    the modules kept whole for their hooks). `shallow`: copy only the top module (for a
    model fxslim made itself; the submodules are traced, not written to)."""
    # torch.fx stores tensor constants (_tensor_constant0 ...) on the root it traces:
    # trace a copy so that the user's model stays exactly as it was
    if shallow:
        root = object.__new__(type(model))
        object.__setattr__(root, "__dict__", {k: (type(v)(v) if type(v) in _CONTAINERS else v)
                                             for k, v in model.__dict__.items()})
    else:
        root = copy_structure(model) if share_weights else _deepcopy(model)
    opaque = hooked_modules(model)
    tracer = FxslimTracer(leaf_modules, [*leaf_paths, *opaque], autowrap_functions)
    snapshot = snapshot_buffers(root, tracer)
    try:
        with recording_semantics(tracer):
            graph = tracer.trace(root, concrete_args=concrete_args)
        moved = restore_mutated_buffers(snapshot)
        if moved:  # forward updates buffers in place: trace again with buffers as nodes
            logger.info("forward writes to buffers %s in place: recording buffer accesses", moved)
            tracer = FxslimTracer(leaf_modules, [*leaf_paths, *opaque], autowrap_functions)
            tracer.proxy_buffer_attributes = True
            with recording_semantics(tracer):
                graph = tracer.trace(root, concrete_args=concrete_args)
            if restore_mutated_buffers(snapshot):
                raise TraceError(f"forward writes to buffers {moved} in a way torch.fx cannot record")
    except TraceError:
        raise
    except Exception as exc:
        restore_mutated_buffers(snapshot)
        where = tracer.failed_path
        if where is None:  # the model's own forward: it cannot be a leaf of itself
            way_out = ("trace the submodules that can be traced (wrap the rest as leaves in a "
                       "module of your own), or pass concrete_args to fix Python control flow")
        else:
            way_out = (f"mark that module as a leaf (trace(..., leaf_paths=['{where}']) or "
                       f"leaf_modules=[ItsClass]), or pass concrete_args to fix Python control flow")
        raise _FxCannotTrace(
            f"torch.fx cannot trace {f'module {where!r}' if where else type(model).__name__ + '.forward'} "
            f"({type(exc).__name__}: {exc}).\n"
            f"  at {_user_frame(exc)}\n"
            f"  Way out: {way_out}."
        ) from exc
    return root, graph, opaque


def _deepcopy(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    copy_gradient_hooks(model, out)
    return out


def _input_specs(inputs: ExampleInputs) -> list[dict[str, Any]]:
    """Shape and dtype of each tensor input (keyword ones with their name)."""
    def spec(t: torch.Tensor) -> dict[str, Any]:
        return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}

    out = []
    for name, t in [(None, a) for a in inputs.args] + list(inputs.kwargs.items()):
        named = {} if name is None else {"name": name}
        if isinstance(t, torch.Tensor):
            out.append({**named, **spec(t)})
        elif isinstance(t, (list, tuple)) and t and all(isinstance(i, torch.Tensor) for i in t):
            out.append({**named, "items": [spec(i) for i in t]})  # a list of images (detectors)
        elif name is None or t is not None and not isinstance(t, (bool, int, float, str)):
            raise TraceError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword "
                             f"inputs, got {type(t).__name__}{f' for {name!r}' if name else ''}")
    return out


# keywords of `trace` that the other entry points pass through to it
TRACE_OPTIONS = ("leaf_modules", "leaf_paths", "concrete_args", "autowrap_functions", "capture")
CAPTURES = ("auto", "fx", "export", "run")

# the record a class-kept pruned model carries into its trace (`fxslim.utils.fxslim_meta`)
_CARRIED = ("fxslim_source", "fxslim_inputs", "fxslim_history", "fxslim_keep")

_CONSTANT = re.compile(r"^_tensor_constant\d+$")


def fingerprint(model: nn.Module, gm: fx.GraphModule | None) -> str:
    """sha256 of a model's architecture: module types, parameter/buffer shapes, graph ops
    (none for a run capture, whose ops depend on the input's values)."""
    parts, params, buffers, seen = [], [], [], set()
    for name, mod in model.named_modules():  # one walk; the order named_parameters/buffers use
        parts.append(f"m:{name}:{type(mod).__qualname__};")
        prefix = f"{name}." if name else ""
        for table, out in ((mod._parameters, params), (mod._buffers, buffers)):
            for k, t in table.items():
                if t is not None and (id(t), out is params) not in seen:
                    seen.add((id(t), out is params))
                    out.append(f"t:{prefix}{k}:{tuple(t.shape)}:{t.dtype};")
    parts += params + buffers
    for n in gm.graph.nodes if gm is not None else ():
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        if target.startswith("_tensor_constant"):
            target = _CONSTANT.sub("_tensor_constant", target)
        parts.append(f"n:{n.op}:{target};")
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def copy_structure(model: nn.Module) -> nn.Module:
    """Copy of the module tree that shares parameter and buffer tensors.

    Every module is a new object with its own attribute containers (so setting a
    parameter, a buffer, a child or the train flag on the copy leaves the original as it
    was); tensors and other attribute values are shared. A GraphModule gets a new graph.
    """
    memo: dict[int, nn.Module] = {}
    if isinstance(model, fx.GraphModule):
        return _copy_graph_module(model, memo)
    return _copy_tree(model, memo)


_CONTAINERS = (dict, OrderedDict, set, list)

try:  # generates the forward code when first needed: analysis and rewrites never call it
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModuleClass
except ImportError:  # pragma: no cover - older or newer torch without it
    _GraphModuleClass = fx.GraphModule


def _graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    return _GraphModuleClass(root, graph, class_name=name)


def compile_now(gm: fx.GraphModule) -> None:
    """Generate `gm`'s forward code now (a lazily built GraphModule defers it to first use)."""
    gm.recompile()
    if hasattr(gm, "real_recompile"):
        gm.real_recompile()


def _copy_tree(mod: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    hit = memo.get(id(mod))
    if hit is not None:
        return hit
    if isinstance(mod, fx.GraphModule):
        return _copy_graph_module(mod, memo)
    new = object.__new__(type(mod))
    memo[id(mod)] = new
    state = {k: (type(v)(v) if type(v) in _CONTAINERS else v) for k, v in mod.__dict__.items()}
    object.__setattr__(new, "__dict__", state)
    children = state["_modules"]
    for name, child in children.items():
        if child is not None:
            children[name] = _copy_tree(child, memo)
    return new


def _copy_graph_module(gm: fx.GraphModule, memo: dict[int, nn.Module]) -> fx.GraphModule:
    """A new GraphModule over copied children and a copy of the graph (node meta kept)."""
    holder = nn.Module()
    holder.__dict__["_parameters"] = dict(gm._parameters)
    holder.__dict__["_buffers"] = dict(gm._buffers)
    holder.__dict__["_non_persistent_buffers_set"] = set(gm._non_persistent_buffers_set)
    for name, child in gm._modules.items():
        holder._modules[name] = None if child is None else _copy_tree(child, memo)
    for node in gm.graph.nodes:  # plain attributes the graph reads (not parameters)
        if node.op == "get_attr" and "." not in node.target and node.target not in holder._parameters \
                and node.target not in holder._buffers and node.target not in holder._modules:
            setattr(holder, node.target, getattr(gm, node.target))
    graph = fx.Graph(owning_module=None, tracer_cls=gm.graph._tracer_cls)
    out = graph.graph_copy(gm.graph, {})
    old_output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    graph.output(out, old_output.type).meta = dict(old_output.meta)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = _graph_module(holder, graph, type(gm).__name__)
    new.training = gm.training
    new.meta = dict(gm.meta)
    memo[id(gm)] = new
    return new
