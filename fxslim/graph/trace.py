"""Tracing: torch.fx symbolic trace plus shape/dtype metadata on every node.

Shapes are propagated with fake tensors (no real compute, no real memory); if the fake
run fails (an op without a fake kernel), fxslim falls back to one real forward pass.
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from fxslim.errors import TraceError

__all__ = ["trace", "as_input_tuple", "node_shapes", "FxslimTracer"]

logger = logging.getLogger(__name__)


def as_input_tuple(example_inputs: Any) -> tuple:
    """Normalise `example_inputs` (a tensor or a sequence of tensors) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TraceError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


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


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch's own code, as 'file:line in func'."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        fn = fr.filename.replace("\\", "/")
        if "/torch/" not in fn and "/fxslim/" not in fn:
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {fr.line}"
    return "<unknown location>"


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type] = (),
    leaf_paths: Iterable[str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap_functions: Iterable = (),
) -> fx.GraphModule:
    """Trace `model` with torch.fx and record shape and dtype on every node.

    The user's model is not modified: the returned GraphModule owns deep copies of
    the parameters.

    Args:
        model: the model to trace (its train/eval mode is kept).
        example_inputs: a tensor or a tuple of tensors, as the model's forward takes them.
        leaf_modules: extra module types to keep whole (not traced through).
        leaf_paths: qualified names of modules to keep whole.
        concrete_args: passed to torch.fx to specialise Python control flow.
        autowrap_functions: free functions to record as single call_function nodes.

    Returns:
        A GraphModule whose nodes carry `meta["tensor_meta"]`.

    Raises:
        TraceError: the model cannot be traced; the message names the module and line.

    Example:
        >>> gm = fxslim.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    """
    inputs = as_input_tuple(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
    else:
        tracer = FxslimTracer(leaf_modules, leaf_paths, autowrap_functions)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:
            where = tracer.failed_path or "<top level>"
            raise TraceError(
                f"torch.fx cannot trace module '{where}' ({type(exc).__name__}: {exc}).\n"
                f"  at {_user_frame(exc)}\n"
                f"  Way out: mark that module as a leaf (trace(..., leaf_paths=['{where}']) or "
                f"leaf_modules=[ItsClass]), or pass concrete_args to fix Python control flow."
            ) from exc
        name = type(model).__name__
        gm = fx.GraphModule(copy.deepcopy(model), graph, class_name=name)
        gm.train(model.training)
    propagate_shapes(gm, inputs)
    return gm


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Write `tensor_meta` on every node, with fake tensors first and a real run as fallback.

    Runs in eval mode (so BatchNorm statistics are never updated) and restores the mode.
    """
    was_training = gm.training
    gm.eval()
    try:
        _propagate(gm, inputs)
    finally:
        gm.train(was_training)


def _propagate(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_inputs = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        ShapeProp(gm, fake_mode=mode).propagate(*fake_inputs)
        return
    except Exception as exc:  # fake kernels are missing for some ops: fall back to a real run
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
