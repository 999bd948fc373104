"""Fuse two consecutive Linear layers with nothing between them into one.

For ``y = B (A x + a) + b`` with A: (m, n) and B: (k, m),

    y = (B A) x + (B a + b),

one Linear with weight ``B A`` (k, n) and bias ``B a + b`` (float64 arithmetic, cast
back). It costs ``k n`` multiply-accumulates per row instead of ``m (n + k)``, so it is
applied only where that is fewer: a bottleneck (a low-rank pair, m small) is left alone,
which also keeps this pass from undoing `LowRankPass`. Both layers must be called once
and A's output read only by B. Eval-mode dropout between them is removed first by
`DropIdentitiesPass` (chain the two in a `PassManager`).

Example:
    >>> res = FuseLinearPass()(gm)
    >>> res.info["fused"]
    [['proj', 'head']]
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from fxslim.passes._rewrite import finish, module_of, only_user, parameter, set_module, start
from fxslim.passes.base import Pass, PassResult

__all__ = ["FuseLinearPass"]


def _fused(a: nn.Linear, b: nn.Linear) -> nn.Linear:
    wa, wb = a.weight.detach().double(), b.weight.detach().double()
    ba = (
        a.bias.detach().double()
        if a.bias is not None
        else torch.zeros(wa.shape[0], dtype=torch.float64)
    )
    bb = (
        b.bias.detach().double()
        if b.bias is not None
        else torch.zeros(wb.shape[0], dtype=torch.float64)
    )
    out = nn.Linear(wa.shape[1], wb.shape[0], device=b.weight.device, dtype=b.weight.dtype)
    out.weight = parameter((wb @ wa).to(b.weight.dtype), b.weight)
    out.bias = parameter((wb @ ba + bb).to(b.weight.dtype), b.weight)
    return out.train(b.training)


class FuseLinearPass(Pass):
    """Replace every eligible Linear -> Linear pair by their product.

    Args:
        force: fuse even where the product costs more MACs than the pair.

    ``info``: ``fused`` ([first, second] pairs; the fused layer sits at the second's path),
    ``linears_before``, ``linears_after``; ``modified`` is True when the count fell.
    """

    def __init__(self, force: bool = False):
        self.force = force

    def call(self, gm: fx.GraphModule) -> PassResult:
        new = start(gm)
        calls = Counter(n.target for n in new.graph.nodes if n.op == "call_module")
        before = _count(new)
        fused = []
        for node in list(new.graph.nodes):
            second = module_of(new, node)
            if not isinstance(second, nn.Linear) or calls[node.target] != 1 or len(node.args) != 1:
                continue
            src = node.args[0]
            first = module_of(new, src) if isinstance(src, fx.Node) else None
            if (
                not isinstance(first, nn.Linear)
                or calls[src.target] != 1
                or only_user(src) is not node
                or len(src.args) != 1
            ):
                continue
            (m, n), k = first.weight.shape, second.weight.shape[0]
            if not self.force and k * n >= m * (n + k):
                continue
            set_module(new, node.target, _fused(first, second))
            node.args = (src.args[0],)
            new.graph.erase_node(src)
            fused.append([src.target, node.target])
        if not fused:
            return PassResult(
                gm, False, {"fused": [], "linears_before": before, "linears_after": before}
            )
        new = finish(new, {"pass": "fuse_linear", "fused": fused, "force": self.force})
        after = _count(new)
        return PassResult(
            new, after < before, {"fused": fused, "linears_before": before, "linears_after": after}
        )


def _count(gm: fx.GraphModule) -> int:
    return sum(
        isinstance(module_of(gm, n), nn.Linear) for n in gm.graph.nodes if n.op == "call_module"
    )
