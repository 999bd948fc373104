"""Fold inference-mode BatchNorm into the neighbouring conv or linear layer.

In eval mode a BatchNorm over channels c is the per-channel affine map

    bn(z)_c = s_c * z_c + t_c,   s = gamma / sqrt(running_var + eps),   t = beta - s * running_mean

(gamma = 1, beta = 0 without ``affine``). Two folds are exact in real arithmetic:

* **producer -> bn** (Conv1d/2d/3d of any groups, or a Linear whose output is (N, C)):
  the conv computes ``z_o = sum W_o . x + b_o``, so ``bn(z)_o = (s_o W_o) . x + s_o (b_o - mu_o) + beta_o``:
  ``W'_o = s_o W_o``, ``b' = s * (b - mu) + beta`` (b = 0 when the layer had no bias).
* **bn -> consumer** (a Linear on (N, C), or a conv with ``groups == 1`` and zero padding):
  ``W (s * x + t) + b = (W diag(s)) x + (b + W t)``: ``W'[:, c] = W[:, c] s_c`` and
  ``b'_o = b_o + sum_{c, k} W[o, c, k] t_c``. A padded conv is excluded: its padding
  zeros would need the value ``-t/s``, not 0.

Either way the BatchNorm node disappears. The arithmetic runs in float64 and is cast
back. Only an eval-mode BatchNorm with running statistics folds (in training mode it
normalises by the batch's statistics, not these), and only into a layer called once
whose output (or input, for the consumer fold) no other node reads.
The result is an inference model: training it again would train the folded layers
without a BatchNorm. The step is recorded so `fxslim.load` replays it.

Example:
    >>> res = FoldBatchNormPass()(fxslim.trace(model.eval(), x))
    >>> res.info["folded"][:1]
    [['conv1', 'bn1']]
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import fx, nn

from fxslim.passes._rewrite import as_graph, finish, module_of, only_user, parameter, start
from fxslim.passes.base import Pass, PassResult

__all__ = ["FoldBatchNormPass", "fold_batchnorm"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) of the eval-mode BatchNorm, in float64."""
    var, mu = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - s * mu


def _rank(node: fx.Node) -> int | None:
    tm = node.meta.get("tensor_meta")
    return len(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _bias(layer: nn.Module, n: int) -> torch.Tensor:
    return (
        layer.bias.detach().double()
        if layer.bias is not None
        else torch.zeros(n, dtype=torch.float64)
    )


def _fold_into_producer(layer: nn.Module, bn: nn.Module) -> None:
    s, t = _affine(bn)
    w = layer.weight.detach()
    shape = (-1,) + (1,) * (w.dim() - 1)
    b = _bias(layer, w.shape[0])
    layer.weight = parameter((w.double() * s.view(shape)).to(w.dtype), w)
    layer.bias = parameter((s * b + t).to(w.dtype), w)  # s (b - mu) + beta = s b + t


def _fold_into_consumer(layer: nn.Module, bn: nn.Module) -> None:
    s, t = _affine(bn)
    w = layer.weight.detach()
    shape = (1, -1) + (1,) * (w.dim() - 2)
    b = _bias(layer, w.shape[0])
    shift = (w.double() * t.view(shape)).flatten(1).sum(1)
    layer.weight = parameter((w.double() * s.view(shape)).to(w.dtype), w)
    layer.bias = parameter((b + shift).to(w.dtype), w)


def _producer_ok(layer: nn.Module, node: fx.Node) -> bool:
    if isinstance(layer, _CONV):
        return True
    return (
        isinstance(layer, nn.Linear) and _rank(node) == 2
    )  # BatchNorm1d on (N, L, C) normalises L


def _consumer_ok(layer: nn.Module, node: fx.Node) -> bool:
    if isinstance(layer, nn.Linear):
        return _rank(node) == 2
    return (
        isinstance(layer, _CONV)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and all(p == 0 for p in layer.padding)
    )


class FoldBatchNormPass(Pass):
    """Fold every eligible eval-mode BatchNorm into its producer (or consumer) layer.

    ``info``: ``folded`` ([layer, batchnorm] pairs, in graph order), ``batchnorms_before``,
    ``batchnorms_after``; ``modified`` is True when the BatchNorm count fell.
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        new = start(gm)
        calls = Counter(n.target for n in new.graph.nodes if n.op == "call_module")
        before = _count(new)
        folded: list[list[str]] = []
        for node in list(new.graph.nodes):
            bn = module_of(new, node)
            if (
                not isinstance(bn, _BN)
                or bn.training
                or bn.running_mean is None
                or calls[node.target] != 1
            ):
                continue
            src = node.args[0] if node.args else None
            prod = module_of(new, src) if isinstance(src, fx.Node) else None
            if (
                prod is not None
                and calls[src.target] == 1
                and only_user(src) is node
                and _producer_ok(prod, src)
            ):
                _fold_into_producer(prod, bn)
                node.replace_all_uses_with(src)
                new.graph.erase_node(node)
                folded.append([src.target, node.target])
                continue
            dst = only_user(node)
            cons = module_of(new, dst) if dst is not None else None
            if (
                cons is not None
                and calls[dst.target] == 1
                and dst.args[0] is node
                and _consumer_ok(cons, node)
            ):
                _fold_into_consumer(cons, bn)
                node.replace_all_uses_with(src)
                new.graph.erase_node(node)
                folded.append([dst.target, node.target])
        if not folded:
            return PassResult(
                gm, False, {"folded": [], "batchnorms_before": before, "batchnorms_after": before}
            )
        new = finish(new, {"pass": "fold_batchnorm", "folded": folded})
        after = _count(new)
        return PassResult(
            new,
            after < before,
            {"folded": folded, "batchnorms_before": before, "batchnorms_after": after},
        )


def _count(gm: fx.GraphModule) -> int:
    return sum(isinstance(module_of(gm, n), _BN) for n in gm.graph.nodes if n.op == "call_module")


def fold_batchnorm(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """`FoldBatchNormPass` on `model` (traced first when it is not a GraphModule); the model is left as it was.

    Example:
        >>> folded = fxslim.fold_batchnorm(model.eval(), x)
    """
    return FoldBatchNormPass()(as_graph(model, example_inputs)).module
