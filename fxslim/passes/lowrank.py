"""Low-rank factorisation: a Linear or conv becomes two thinner layers from a truncated SVD.

A Linear's weight W is an (out, in) matrix; a conv's is read as the (out, in*k1*k2...)
matrix of its kernel rows (groups = 1). With the SVD ``W = U diag(s) V^T`` and rank r,

    W_r = (U_r diag(sqrt s_r)) (diag(sqrt s_r) V_r^T) = B A,

the best rank-r approximation in Frobenius norm (Eckart-Young), with error
``||W - W_r||_F = sqrt(sum_{i > r} s_i^2)``. A (r, in) becomes the first layer (a Linear
without bias, or a conv with the original kernel, stride, padding and dilation and r
output channels), B (out, r) the second (a Linear, or a 1x1 conv) with the original
bias. The square roots split the scale evenly between the two. At full rank the pair
computes the layer exactly (up to rounding).

Rank per layer, by one of:

* ``ranks``: {module path: r} as given;
* ``energy``: the smallest r keeping that share of ``sum s_i^2``;
* ``rank_ratio``: ``round(ratio * min(out, in))``;
* ``target_params``: one energy level for all layers, found by bisection, so the model's
  parameters fall to that share of what they were (or as near as factorising allows).

Except with ``ranks``, a layer is factorised only where ``r (out + in) < out * in``
(the pair is smaller). The pair sits at the layer's path as ``nn.Sequential(first,
second)`` (state names ``fc.0.weight``, ``fc.1.weight``, ``fc.1.bias``); the ranks are
recorded so `fxslim.load` rebuilds the same structure.

Example:
    >>> res = LowRankPass(rank_ratio=0.5, layers=["encoder.layers.encoder_layer_0.mlp.0"])(gm)
    >>> res.info["ranks"]
    {'encoder.layers.encoder_layer_0.mlp.0': 384}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from torch import fx, nn

from fxslim.errors import ArgumentError
from fxslim.passes._rewrite import finish, module_of, parameter, set_module, start
from fxslim.passes.base import Pass, PassResult

__all__ = ["LowRankPass", "factorize", "singular_values"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matrix(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().double().flatten(1)


def singular_values(layer: nn.Module) -> torch.Tensor:
    """Singular values of the layer's (out, in*k...) weight matrix, largest first (float64)."""
    return torch.linalg.svdvals(_matrix(layer))


def factorize(layer: nn.Module, rank: int) -> nn.Sequential:
    """The (first, second) pair of rank `rank` that approximates `layer` (see the module docstring)."""
    w = layer.weight.detach()
    u, s, vh = torch.linalg.svd(_matrix(layer), full_matrices=False)
    root = s[:rank].sqrt()
    a, b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    kw = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Linear):
        first, second = (
            nn.Linear(w.shape[1], rank, bias=False, **kw),
            nn.Linear(rank, w.shape[0], **kw),
        )
    else:
        conv = type(layer)
        first = conv(
            layer.in_channels,
            rank,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            bias=False,
            padding_mode=layer.padding_mode,
            **kw,
        )
        second = conv(rank, layer.out_channels, 1, **kw)
    first.weight = parameter(a.reshape(first.weight.shape).to(w.dtype), w)
    second.weight = parameter(b.reshape(second.weight.shape).to(w.dtype), w)
    second.bias = parameter(layer.bias.detach(), w) if layer.bias is not None else None
    return nn.Sequential(first, second).train(layer.training)


def _rank_for(s: torch.Tensor, energy: float) -> int:
    cum = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-300)
    return min(
        int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1, len(s)
    )


def _saves(shape: tuple[int, int], r: int) -> bool:
    return r * (shape[0] + shape[1]) < shape[0] * shape[1]


class LowRankPass(Pass):
    """Factorise Linear and conv (groups = 1) layers by truncated SVD.

    Args:
        ranks / energy / rank_ratio / target_params: how ranks are chosen (exactly one;
            see the module docstring).
        layers: module paths to consider (default: every Linear and conv called once).

    ``info``: ``ranks`` ({path: r}), ``full_ranks``, ``discarded`` ({path: sqrt of the
    discarded s_i^2}), ``params_before``, ``params_after``; ``modified`` is True when a
    layer was factorised.
    """

    def __init__(
        self,
        *,
        ranks: Mapping[str, int] | None = None,
        energy: float | None = None,
        rank_ratio: float | None = None,
        target_params: float | None = None,
        layers: Iterable[str] | None = None,
    ):
        chosen = [
            k
            for k, v in {
                "ranks": ranks,
                "energy": energy,
                "rank_ratio": rank_ratio,
                "target_params": target_params,
            }.items()
            if v is not None
        ]
        if len(chosen) != 1:
            raise ArgumentError(
                f"LowRankPass takes exactly one of ranks, energy, rank_ratio, target_params; got {chosen}"
            )
        for name, v in (
            ("energy", energy),
            ("rank_ratio", rank_ratio),
            ("target_params", target_params),
        ):
            if v is not None and not 0.0 < v <= 1.0:
                raise ArgumentError(f"{name} must be in (0, 1], got {v!r}")
        self.ranks, self.energy, self.rank_ratio, self.target_params = (
            ranks,
            energy,
            rank_ratio,
            target_params,
        )
        self.layers = None if layers is None else set(layers)

    def _candidates(self, gm: fx.GraphModule) -> dict[str, nn.Module]:
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        out = {}
        for n in gm.graph.nodes:
            m = module_of(gm, n)
            ok = isinstance(m, nn.Linear) or isinstance(m, _CONV) and m.groups == 1
            if ok and calls[n.target] == 1 and (self.layers is None or n.target in self.layers):
                out[n.target] = m
        if self.ranks is not None:
            missing = sorted(set(self.ranks) - set(out))
            if missing:
                raise ArgumentError(f"no Linear or conv (groups=1) called once at {missing}")
        return out

    def _choose(self, layers: dict[str, nn.Module], total: int) -> dict[str, int]:
        if self.ranks is not None:
            return {k: int(r) for k, r in self.ranks.items()}
        svals = {k: singular_values(m) for k, m in layers.items()}
        shapes = {k: tuple(_matrix(m).shape) for k, m in layers.items()}

        def pick(energy: float | None) -> dict[str, int]:
            out = {}
            for k, s in svals.items():
                r = (
                    max(1, round(self.rank_ratio * len(s)))
                    if energy is None
                    else _rank_for(s, energy)
                )
                if _saves(shapes[k], r):
                    out[k] = r
            return out

        if self.target_params is None:
            return pick(self.energy)

        def params(ranks: dict[str, int]) -> int:
            return total - sum(
                shapes[k][0] * shapes[k][1] - r * sum(shapes[k]) for k, r in ranks.items()
            )

        lo, hi = 0.0, 1.0  # energy: lower keeps fewer parameters
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if params(pick(mid)) <= self.target_params * total else (lo, mid)
        return pick(lo)

    def call(self, gm: fx.GraphModule) -> PassResult:
        new = start(gm)
        layers = self._candidates(new)
        before = sum(p.numel() for p in new.parameters())
        ranks = self._choose(layers, before)
        nodes = {n.target: n for n in new.graph.nodes if n.op == "call_module"}
        info: dict = {"ranks": {}, "full_ranks": {}, "discarded": {}, "params_before": before}
        for target, r in ranks.items():
            layer = layers[target]
            s = singular_values(layer)
            if not 1 <= r <= len(s):
                raise ArgumentError(f"rank {r} for '{target}' is outside 1..{len(s)}")
            set_module(new, target, factorize(layer, r))
            node = nodes[target]
            with new.graph.inserting_after(node):
                second = new.graph.call_module(f"{target}.1", (node,))
            node.replace_all_uses_with(
                second, delete_user_cb=lambda user, second=second: user is not second
            )
            node.target = f"{target}.0"
            info["ranks"][target], info["full_ranks"][target] = r, len(s)
            info["discarded"][target] = float((s[r:] ** 2).sum().sqrt())
        if not ranks:
            return PassResult(gm, False, {**info, "params_after": before})
        new = finish(new, {"pass": "lowrank", "ranks": info["ranks"]})
        info["params_after"] = sum(p.numel() for p in new.parameters())
        return PassResult(new, True, info)
