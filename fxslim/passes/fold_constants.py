"""Fold parameter-only subgraphs: compute once what every forward recomputes from weights.

A node is constant when it reads only parameters, buffers and Python values, through
constant nodes, and its op is deterministic and side-effect free. Every forward computes
the same tensor there, so it can be computed once:

    f(W_1, ..., W_k) = C   for fixed W  =>  replace the subgraph by a buffer holding C.

Typical cases: a relative-position bias gathered from its table by a fixed index
(Swin, BEiT: ``table[index.view(-1)].view(N, N, H).permute(2, 0, 1)``), a bias assembled
from pieces (``cat(q_bias, zeros_like(v_bias), v_bias)``), a weight scaled or transposed
in the forward. Only the subgraph's exits (constant nodes read by a non-constant node) are
stored, as buffers named ``folded_<node>`` on the graph module; parameters and buffers no
node reads any more are removed from the copy (the user's model keeps them).

What is not folded: module calls (they hold their own state; BatchNorm has
`FoldBatchNormPass`), random ops and in-place methods, nodes with no input at all (a
``torch.zeros(n)`` costs nothing and would only grow the state), and results larger than
``max_elements``. In training mode parameters are not constants (folding them would stop
their gradients): only subgraphs of buffers fold. The result, like BatchNorm folding, is an
inference model. The step is recorded so `fxslim.load` replays it.

torch.fx's own ``experimental.const_fold.split_const_subgraphs`` splits the module into
two submodules and renames every module path (``layers.0`` -> ``layers_0``) and the folded
tensors (a ParameterList); this pass keeps the user's paths and parameter names, which
pruning plans, save/load and the class-keeping rewrite rely on.

Example:
    >>> res = FoldConstantsPass()(fxslim.trace(model.eval(), x))
    >>> res.info["folded"][:1]
    ['features_1_0_attn_relative_position_bias']
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim._args import positive_int
from fxslim.passes._rewrite import as_graph, finish, start
from fxslim.passes.base import Pass, PassResult

__all__ = ["FoldConstantsPass", "fold_constants"]

_RANDOM = {
    torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli, torch.normal,
    torch.multinomial, torch.poisson, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.gumbel_softmax, F.rrelu,
}  # fmt: skip
_RANDOM_METHODS = {"bernoulli", "multinomial", "random_", "uniform_", "normal_", "exponential_"}


def _tensor_attr(gm: fx.GraphModule, target: str) -> torch.Tensor | None:
    try:
        value = gm.get_parameter(target)
    except AttributeError:
        try:
            value = gm.get_buffer(target)
        except AttributeError:
            return None
    return value


def _foldable_op(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target not in _RANDOM and not node.is_impure()
    if node.op == "call_method":
        return node.target not in _RANDOM_METHODS and not node.target.endswith("_")
    return False


def _constant_nodes(gm: fx.GraphModule, fold_parameters: bool) -> set[fx.Node]:
    const: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = _tensor_attr(gm, node.target)
            if t is not None and (fold_parameters or not isinstance(t, nn.Parameter)):
                const.add(node)
        elif (
            _foldable_op(node)
            and node.all_input_nodes
            and all(n in const for n in node.all_input_nodes)
        ):
            const.add(node)
    return const


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[fx.Node, Any]:
    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in nodes:  # graph order: inputs before users
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            if node.op == "get_attr":
                env[node] = _tensor_attr(gm, node.target)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            else:
                self_obj, *rest = args
                env[node] = getattr(self_obj, node.target)(*rest, **kwargs)
    return env


def _used_internally(target: str, called: set[str]) -> bool:
    """Whether the tensor at `target` belongs to a module some call_module node runs."""
    owner = target.rpartition(".")[0]
    return any(owner == c or owner.startswith(c + ".") for c in called)


def _drop_unread(gm: fx.GraphModule) -> list[str]:
    """Remove parameters and buffers of `gm` (a copy) that no node reads any more."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    dropped = []
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name in read or _used_internally(name, called):
            continue
        parent, _, attr = name.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        else:
            del owner._buffers[attr]
        dropped.append(name)
    return dropped


class FoldConstantsPass(Pass):
    """Replace every parameter-only subgraph by a buffer holding its value.

    Args:
        max_elements: a constant larger than this stays computed (an ``expand`` of a small
            weight can be far larger stored than computed).

    ``info``: ``folded`` (names of the nodes now read from a buffer, in graph order),
    ``ops_before``, ``ops_after`` (nodes that compute: calls and methods), ``removed_tensors``
    (parameters and buffers no node reads any more); ``modified`` is True when the op count
    fell.
    """

    def __init__(self, max_elements: int = 1 << 24):
        self.max_elements = positive_int("max_elements", max_elements)

    def call(self, gm: fx.GraphModule) -> PassResult:
        new = start(gm)
        before = _ops(new)
        const = _constant_nodes(new, fold_parameters=not gm.training)
        exits = [
            n for n in new.graph.nodes
            if n in const and n.op != "get_attr" and any(u not in const for u in n.users)
        ]  # fmt: skip
        env = _evaluate(new, [n for n in new.graph.nodes if n in const]) if exits else {}
        folded = []
        for node in exits:
            value = env[node]
            if not isinstance(value, torch.Tensor) or value.numel() > self.max_elements:
                continue
            name = f"folded_{node.name}"
            new.register_buffer(name, value.detach().clone())
            with new.graph.inserting_before(node):
                attr = new.graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            folded.append(node.name)
        info: dict[str, Any] = {"folded": folded, "ops_before": before}
        if not folded:
            return PassResult(gm, False, info | {"ops_after": before, "removed_tensors": []})
        new.graph.eliminate_dead_code()
        removed = _drop_unread(new)
        new = finish(new, {"pass": "fold_constants", "folded": folded})
        after = _ops(new)
        return PassResult(new, after < before, info | {"ops_after": after, "removed_tensors": removed})


def _ops(gm: fx.GraphModule) -> int:
    return sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes)


def fold_constants(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """`FoldConstantsPass` on `model` (traced first when it is not a GraphModule); the model is left as it was.

    Example:
        >>> folded = fxslim.fold_constants(model.eval(), x)
    """
    return FoldConstantsPass()(as_graph(model, example_inputs)).module
