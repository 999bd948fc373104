"""The third capture: run the model once, eagerly, and record its torch-level calls.

torch.fx cannot follow detectors (image lists, data-dependent control flow), and
torch.export stops at their data-dependent postprocessing (``nonzero``, ``nms``, a
``topk`` sized by a score threshold). This capture runs the model on the example inputs
under a `torch.overrides.TorchFunctionMode` and writes every call it sees (torch
functions, ``torch.nn.functional``, Tensor methods and operators) as a node of an
``fx.Graph``, in the forms the one rule table already knows:

* a module whose type has a rule (``nn.Conv2d``, ``nn.BatchNorm2d`` ...) is one
  ``call_module`` node, as torch.fx keeps its leaves (module hooks find them and give
  every node its ``nn_module_stack``, the user's module path); one with hooks of the
  user's is recorded call by call instead, so what its hooks compute is in the graph;
* a parameter or buffer is a ``get_attr`` node with the user's qualified name, so the
  function forms (``F.conv2d(x, weight, ...)``) find the module that owns it;
* ``x.view(...)`` is ``call_method`` (``x + y`` reaches the mode as the method ``add``);
  ``x[i]`` and the reflected operators (``2 - x``) are ``operator`` calls;
* every other call (``nms``, ``nonzero``, box decoding, a tensor made from nothing) has no
  rule: the analysis pins what it touches, naming the op and the module path. Detector
  heads' output convs (anchors x classes, box coordinates) are pinned by these anyway.

Sizes, and the branch the forward took, are those of this one run: the graph is
specialised to the example inputs and is never replayed. It only feeds the analysis;
the rewrite slices a copy of the user's own module tree (`fxslim.passes.prune.apply_plan`
does so for this capture) and the oracles run the user's classes. Calling the
GraphModule itself raises a `TraceError`.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fxslim._inputs import ExampleInputs
from fxslim.errors import TraceError
from fxslim.graph import rules as R
from fxslim.graph.shapes import _record
from fxslim.runtime.measure import FlopCounter

__all__ = ["FLOPS", "RUN_MODEL", "SPECIALISED", "UNUSED", "capture_run"]

try:
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModuleClass
except ImportError:  # pragma: no cover - torch without it
    _GraphModuleClass = fx.GraphModule

logger = logging.getLogger(__name__)

RUN_MODEL = "run_capture_model"  # gm.meta key: the module tree the run capture ran (shares tensors)
UNUSED = "run_capture_unused"  # gm.meta key: names of the parameters the run never read
FLOPS = "fxslim_flops"  # node.meta key: {ATen op: flops} its call ran (cost model input)
SPECIALISED = (
    "the graph records one eager run on the example inputs: its sizes and the branches taken "
    "are those of that run (it feeds the analysis only; the pruned model is the user's classes)"
)

# Tensor operators as the calls the rule table knows; (fn, True) swaps the operands (x.__radd__(y) = y + x)
_OPERATORS: dict[str, tuple[Any, bool]] = {
    "__add__": (operator.add, False),
    "__radd__": (operator.add, True),
    "__sub__": (operator.sub, False),
    "__rsub__": (operator.sub, True),
    "__mul__": (operator.mul, False),
    "__rmul__": (operator.mul, True),
    "__truediv__": (operator.truediv, False),
    "__rtruediv__": (operator.truediv, True),
    "__matmul__": (operator.matmul, False),
    "__rmatmul__": (operator.matmul, True),
    "__neg__": (operator.neg, False),
    "__getitem__": (operator.getitem, False),
    "__iadd__": (operator.iadd, False),
    "__imul__": (operator.imul, False),
    "__isub__": (operator.isub, False),
}


def _is_leaf(mod: nn.Module) -> bool:
    """A module the rule table knows as a whole (the lookup `call_module` nodes get)."""
    t = type(mod)
    return t in R.RULES or any(b in R.RULES and t.forward is b.forward for b in t.__mro__[1:])


class _Recorder(TorchFunctionMode):
    """Writes the calls of one forward into `graph` (see the module docstring)."""

    def __init__(
        self, graph: fx.Graph, names: dict[int, str], paths: dict[int, str], hooked: set[int]
    ):
        super().__init__()
        self.graph, self.names, self.paths = graph, names, paths
        self.hooked = hooked  # modules with the user's hooks: recorded call by call, hooks included
        self.env: dict[int, fx.Node] = {}  # id(tensor) -> the node that made it
        self.alive: list[torch.Tensor] = []  # every recorded tensor stays alive: ids are not reused
        self.attrs: dict[str, fx.Node] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.stack: list[nn.Module] = []
        self.leaf: nn.Module | None = None  # inside a leaf module: its calls are not recorded
        self.quiet = False  # in a hook: fxslim's own tensor queries are not the model's calls
        self.flops: FlopCounter | None = None
        self.counted: dict[Any, int] = {}

    # -- nodes ------------------------------------------------------------------------
    def _module_stack(self) -> dict[str, tuple[str, str]]:
        return {self.paths[id(m)]: (self.paths[id(m)], type(m).__qualname__) for m in self.stack}

    def _node(self, op: str, target: Any, args: tuple, kwargs: dict, result: Any) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        node.meta["nn_module_stack"] = self._module_stack()
        if self.flops is not None:  # what ran since the last node is this node's work
            counts = self.flops.get_flop_counts().get("Global", {})
            delta = {
                k: v - self.counted.get(k, 0)
                for k, v in counts.items()
                if v != self.counted.get(k, 0)
            }
            if delta:
                node.meta[FLOPS] = delta
            self.counted = dict(counts)
        _record(node, result)
        self._bind(node, result)
        return node

    def _bind(self, node: fx.Node, result: Any) -> None:
        """Map the tensors of `result` to `node` (an element of a tuple to a getitem of it)."""
        if isinstance(result, torch.Tensor):
            self.env[id(result)] = node
            self.alive.append(result)
        elif isinstance(result, (tuple, list)) and any(
            isinstance(r, torch.Tensor) for r in pytree.tree_leaves(result)
        ):
            for i, r in enumerate(result):
                if isinstance(r, (torch.Tensor, tuple, list)):
                    sub = self.graph.create_node("call_function", operator.getitem, (node, i), {})
                    sub.meta["nn_module_stack"] = node.meta["nn_module_stack"]
                    _record(sub, r)
                    self._bind(sub, r)

    def arg(self, a: Any) -> Any:
        """A call's argument with its tensors as nodes."""

        def one(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            node = self.env.get(id(t))
            if node is not None:
                return node
            name = self.names.get(id(t))
            if (
                name is None
            ):  # made where nothing was recorded (inside a leaf, from numpy): a constant
                name = f"_fxslim_constant{len(self.constants)}"
                self.constants[name] = t
            node = self.attrs.get(name)
            if node is None:
                node = self.attrs[name] = self.graph.get_attr(name)
                _record(node, t)
            return node

        return pytree.tree_map(one, a)

    # -- the mode ---------------------------------------------------------------------
    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.leaf is not None or self.quiet:
            return func(*args, **kwargs)
        if func is torch.Tensor.__iter__:  # iterating a tensor: its unbind(0)
            parts = args[0].unbind(0)
            self._node("call_method", "unbind", (self.arg(args[0]), 0), {}, parts)
            return iter(parts)
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        mutated = out is None and name == "__setitem__"
        if not mutated and not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(out)):
            return out  # sizes, items, bools: literals in later calls (the specialisation)
        a, k = self.arg(args), self.arg(kwargs)
        if name in _OPERATORS and getattr(torch.Tensor, name, None) is func:
            fn, swap = _OPERATORS[name]
            self._node("call_function", fn, (a[1], a[0]) if swap else a, k, out)
        elif getattr(torch.Tensor, name, None) is func:
            # a method (in place or not), or __setitem__: the first operand now holds the result
            self._node("call_method", name, a, k, args[0] if mutated else out)
        else:
            self._node("call_function", func, a, k, out)
        return out

    # -- module hooks -----------------------------------------------------------------
    def pre_hook(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        self.stack.append(mod)
        if self.leaf is None and id(mod) not in self.hooked and _is_leaf(mod):
            self.quiet = True
            self.leaf_inputs = (self.arg(args), self.arg(kwargs))
            self.quiet, self.leaf = False, mod

    def post_hook(self, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if self.leaf is mod:
            self.stack.pop()
            self.quiet, self.leaf = True, None
            try:
                self._node("call_module", self.paths[id(mod)], *self.leaf_inputs, out)
            finally:
                self.quiet = False
        elif self.stack and self.stack[-1] is mod:
            self.stack.pop()


def capture_run(root: nn.Module, inputs: ExampleInputs) -> fx.GraphModule:
    """Record one eval-mode forward of `root` on `inputs` (see the module docstring).

    `root` is run as it is (callers pass a copy of the user's tree): hooks are added to
    its modules and removed after. The GraphModule holds `root`'s modules and tensors
    under their own names, its nodes carry ``tensor_meta`` and ``nn_module_stack``, and
    ``gm.meta[RUN_MODEL]`` is `root`.

    Raises:
        TraceError: the model's forward fails on the example inputs.
    """
    graph = fx.Graph()
    names: dict[int, str] = {}
    for table in (
        root.named_buffers(remove_duplicate=False),
        root.named_parameters(remove_duplicate=False),
    ):
        for name, t in table:
            names.setdefault(id(t), name)
    paths = {id(m): p for p, m in root.named_modules(remove_duplicate=False)}
    hooked = {id(m) for m in root.modules() if m._forward_hooks or m._forward_pre_hooks}
    rec = _Recorder(graph, names, paths, hooked)
    flat, _ = pytree.tree_flatten((inputs.args, inputs.kwargs))
    for i, t in enumerate(flat):
        if isinstance(t, torch.Tensor):
            node = graph.placeholder(f"input_{i}")
            _record(node, t)
            rec.env[id(t)] = node
    handles = []
    for mod in root.modules():
        handles.append(mod.register_forward_pre_hook(rec.pre_hook, with_kwargs=True))
        handles.append(mod.register_forward_hook(rec.post_hook, with_kwargs=True, always_call=True))
    training = [m for m in root.modules() if m.training]
    root.eval()
    try:
        with torch.no_grad(), FlopCounter() as rec.flops, rec:
            out = inputs.call(root)
    except Exception as exc:
        raise TraceError(
            f"{type(root).__name__} fails on the example inputs {inputs.describe()} while fxslim "
            f"records its run ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m in training:
            m.training = True
    graph.output(rec.arg(out))
    attrs: dict[str, Any] = dict(rec.constants)
    for node in graph.nodes:
        if node.op == "call_module":
            attrs[node.target] = root.get_submodule(node.target)
        elif node.op == "get_attr" and node.target not in attrs:
            owner, _, field = node.target.rpartition(".")
            attrs[node.target] = getattr(root.get_submodule(owner), field)
    # lazily compiled: this graph is never run, so never compiled
    gm = _GraphModuleClass(attrs, graph, class_name=type(root).__name__)
    gm.forward = _not_runnable
    unknown = sorted(
        {
            _op_name(n)
            for n in graph.nodes
            if n.op in ("call_function", "call_method")
            and R.lookup_rule(n, None) is None
            and n.meta.get("tensor_meta") is not None
        }
    )
    logger.info(
        "run capture of %s (specialised to the example inputs): %d nodes, %d ops with no rule "
        "(they pin what they touch): %s",
        type(root).__name__,
        len(graph.nodes),
        len(unknown),
        unknown[:20],
    )
    read = {id(t) for n in graph.nodes if n.op == "get_attr" for t in [attrs[n.target]]}
    read |= {
        id(p) for n in graph.nodes if n.op == "call_module" for p in attrs[n.target].parameters()
    }
    unused = [name for name, p in root.named_parameters() if id(p) not in read]
    if unused:  # e.g. a training-only branch: its sizes are not checked by this run
        logger.warning(
            "the recorded run of %s never reads %d parameters (e.g. '%s'): they keep their sizes, "
            "and a forward that reads them (another mode or input) may not fit a prune",
            type(root).__name__,
            len(unused),
            unused[0],
        )
    gm.meta[RUN_MODEL] = root
    gm.meta[UNUSED] = unused
    return gm


def _op_name(node: fx.Node) -> str:
    return (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", str(node.target))
    )


def _not_runnable(*args: Any, **kwargs: Any) -> Any:
    raise TraceError(
        "this graph records one eager run (capture='run') and cannot be run itself: run the "
        "model, or the model fxslim.prune returns (the user's own classes)"
    )
