"""Drop nodes that compute the identity at inference (after pruning or folding many do).

Each entry of `IDENTITY_RULES` is one predicate over an fx node and the module it calls,
with the identity it relies on. A matching node's users read its input instead:

* ``nn.Identity``: ``f(x) = x``;
* ``nn.Dropout*`` in eval mode and ``F.dropout(..., training=False)``: ``f(x) = x``;
* ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` with a Python number: ``f(x) = x``
  (only where the result's shape equals x's: ``x + 0`` never broadcasts a scalar up);
* ``torch.cat([x], dim)``: one tensor concatenated is itself;
* ``flatten`` / ``reshape`` / ``view`` / ``contiguous`` whose output shape equals its
  input shape: the same values in the same order. (A prune can leave such a node
  behind, e.g. a flatten over a spatial size that became 1x1.)

Example:
    >>> res = DropIdentitiesPass()(gm)
    >>> res.info["dropped"]
    ['dropout', 'flatten']
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.graph.shapes import node_shapes
from fxslim.passes._rewrite import finish, module_of, start
from fxslim.passes.base import Pass, PassResult

__all__ = ["IDENTITY_RULES", "DropIdentitiesPass"]

_DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_NEUTRAL = {
    operator.add: 0,
    operator.sub: 0,
    operator.mul: 1,
    operator.truediv: 1,
    torch.add: 0,
    torch.sub: 0,
    torch.mul: 1,
    torch.div: 1,
}
_SAME_SHAPE = (torch.flatten, torch.reshape, "flatten", "reshape", "view", "contiguous")


def _same_shape(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    return (
        isinstance(src, fx.Node)
        and node_shapes(src) is not None
        and node_shapes(src) == node_shapes(node)
    )


def _training_flag(node: fx.Node) -> Any:
    return node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)


# (predicate(node, module or None), identity relied on)
IDENTITY_RULES: list[tuple[Callable[[fx.Node, Any], bool], str]] = [
    (lambda n, m: isinstance(m, nn.Identity), "Identity(x) = x"),
    (lambda n, m: isinstance(m, _DROPOUT) and not m.training, "eval-mode dropout(x) = x"),
    (
        lambda n, m: (
            n.op == "call_function"
            and n.target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
            and _training_flag(n) is False
        ),
        "dropout(x, training=False) = x",
    ),
    (
        lambda n, m: (
            n.op == "call_function"
            and n.target in _NEUTRAL
            and len(n.args) == 2
            and not n.kwargs
            and isinstance(n.args[0], fx.Node)
            and type(n.args[1]) in (int, float)
            and n.args[1] == _NEUTRAL[n.target]
            and _same_shape(n)
        ),
        "x + 0 = x - 0 = x * 1 = x / 1 = x",
    ),
    (
        lambda n, m: (
            n.op == "call_function"
            and n.target is torch.cat
            and isinstance(n.args[0], (list, tuple))
            and len(n.args[0]) == 1
        ),
        "cat([x]) = x",
    ),
    (
        lambda n, m: (
            n.op in ("call_function", "call_method") and n.target in _SAME_SHAPE and _same_shape(n)
        ),
        "a reshape to the input's own shape = x",
    ),
]


def _identity_input(node: fx.Node, module: Any) -> fx.Node | None:
    for pred, _why in IDENTITY_RULES:
        if pred(node, module):
            src = node.args[0]
            return src[0] if isinstance(src, (list, tuple)) else src
    return None


class DropIdentitiesPass(Pass):
    """Remove every node an `IDENTITY_RULES` entry matches.

    ``info``: ``dropped`` (node names, in graph order), ``nodes_before``, ``nodes_after``;
    ``modified`` is True when the node count fell.
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        new = start(gm)
        before = len(new.graph.nodes)
        dropped = []
        for node in list(new.graph.nodes):
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            src = _identity_input(node, module_of(new, node))
            if isinstance(src, fx.Node):
                node.replace_all_uses_with(src)
                new.graph.erase_node(node)
                dropped.append(node.name)
        if not dropped:
            return PassResult(
                gm, False, {"dropped": [], "nodes_before": before, "nodes_after": before}
            )
        new = finish(new, {"pass": "drop_identities", "dropped": dropped})
        after = len(new.graph.nodes)
        return PassResult(
            new, after < before, {"dropped": dropped, "nodes_before": before, "nodes_after": after}
        )
