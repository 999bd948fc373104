"""Channel importance: one score per unit of a channel group (higher = keep).

Every criterion sees the whole group: a score is computed per member (each parameter
whose dim the group slices), reduced over the indices of a unit, normalised per member
(so a large consumer matrix does not drown a BatchNorm), then reduced over members.

* magnitude (L1 / L2): ``s_i = ||W[i]||_p`` over the member's other dims;
* BatchNorm scale: ``|gamma_i|`` of the norm members only (network slimming);
* first-order Taylor: ``|sum W[i] * dL/dW[i]|`` accumulated over a few batches;
* activation: mean |a_i| or APoZ (share of a_i <= 0; low APoZ = important) over
  calibration batches, read on the group's activations;
* sensitivity: loss increase when unit i is removed (its channels made dead), per batch;
* LAMP: ``w_i^2 / sum_{j: w_j^2 >= w_i^2} w_j^2`` per member, scale-free across layers;
* random: a seeded baseline.

Any callable ``(module, group) -> scores`` plugs in the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxslim._args import closest
from fxslim.errors import ArgumentError
from fxslim.graph.coupling import ChannelGroup, Member
from fxslim.utils import sorted_unique

__all__ = [
    "ActivationImportance",
    "BNScaleImportance",
    "Importance",
    "LAMPImportance",
    "MagnitudeImportance",
    "RandomImportance",
    "SensitivityImportance",
    "TaylorImportance",
    "get_importance",
    "l1_importance",
    "reduce_units",
]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.LeakyReLU)


def reduce_units(group: ChannelGroup, member: Member, per_index: np.ndarray, how: str = "mean") -> np.ndarray:
    """Per-unit reduction (mean, sum or max) of a per-index score of one member."""
    cls = group.member_class[member]
    if cls in group.identity:  # one index per unit, in order: nothing to reduce
        return per_index
    units = group.unit_of[cls]
    ok = units >= 0
    u, v = units[ok], per_index[ok]
    if how == "max":
        out = np.full(group.size, -np.inf)
        np.maximum.at(out, u, v)
        return np.where(np.isfinite(out), out, 0.0)
    sums = np.bincount(u, weights=v, minlength=group.size)
    if how == "sum":
        return sums
    return sums / np.maximum(np.bincount(u, minlength=group.size), 1)


def _normalise(x: np.ndarray, how: str | None) -> np.ndarray:
    if how is None:
        return x
    if how == "mean":
        return x / (np.add.reduce(np.abs(x)) / max(x.size, 1) + 1e-12)  # ndarray.mean's wrapper costs more
    if how == "sum":
        return x / (np.abs(x).sum() + 1e-12)
    if how == "max":
        return x / (np.abs(x).max() + 1e-12)
    if how == "standard":
        return (x - x.mean()) / (x.std() + 1e-12)
    raise ValueError(f"unknown normalisation {how!r}")


def _combine(parts: list[np.ndarray], how: str, size: int) -> np.ndarray:
    if not parts:
        return np.zeros(size)
    if how == "sum":
        return np.add.reduce(parts)
    if how == "mean":
        return np.add.reduce(parts) / len(parts)
    if how == "max":
        return np.maximum.reduce(parts)
    raise ValueError(f"unknown member reduction {how!r}")


class Importance:
    """Base criterion: per-member per-index scores, reduced to units, normalised, combined.

    Args:
        unit_reduction: how a unit's indices are reduced ("mean", "sum", "max").
        member_reduction: how members are combined ("sum", "mean", "max").
        normalize: per-member normalisation ("mean", "sum", "max", "standard" or None).
    """

    roles: tuple[str, ...] = ("out", "in", "norm")

    def __init__(self, unit_reduction: str = "mean", member_reduction: str = "sum", normalize: str | None = "mean"):
        self.unit_reduction, self.member_reduction, self.normalize = unit_reduction, member_reduction, normalize
        self._cache: dict = {}

    def per_index(self, gm: nn.Module, member: Member) -> np.ndarray | None:
        raise NotImplementedError

    def members(self, group: ChannelGroup) -> list[Member]:
        return [m for m in group.members if m.kind == "param" and m.role in self.roles]

    def __call__(self, gm: nn.Module, group: ChannelGroup) -> np.ndarray:
        parts = []
        for m in self.members(group):
            t = self.param(gm, m.target)
            key = (id(t), t._version, m.dim)  # the cache holds t, so its id stays unique
            hit = self._cache.get(key)
            v = hit[1] if hit is not None else self.per_index(gm, m)
            if hit is None:
                self._cache[key] = (t, v)
            if v is None:
                continue
            parts.append(_normalise(reduce_units(group, m, v, self.unit_reduction), self.normalize))
        return _combine(parts, self.member_reduction, group.size)

    def reset(self) -> None:
        """Forget cached scores and tables (called before each scoring of a model)."""
        self._cache.clear()

    def param(self, gm: nn.Module, target: str) -> torch.Tensor:
        """`gm.get_parameter(target)` through a per-module table (path walks add up)."""
        hit = self._cache.get(("params", id(gm)))
        if hit is None or hit[0] is not gm:
            hit = self._cache[("params", id(gm))] = (gm, dict(gm.named_parameters(remove_duplicate=False)))
        return hit[1][target]


class MagnitudeImportance(Importance):
    """L_p magnitude of each index's slice (p = 1 or 2)."""

    def __init__(self, p: int = 1, **kw: Any):
        super().__init__(**kw)
        self.p = p

    def per_index(self, gm: nn.Module, m: Member) -> np.ndarray:
        t = self.param(gm, m.target)
        key = ("mag", id(t), t._version)  # the cached entry holds t: its id stays unique
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = (t, _magnitudes(t.detach(), self.p))
        sums = hit[1]
        if m.dim not in sums:
            a = _powered(t.detach(), self.p)
            sums[m.dim] = a.sum([d for d in range(a.dim()) if d != m.dim]).double().numpy()
        return sums[m.dim]


_local = threading.local()


def _workspace(t: torch.Tensor) -> torch.Tensor:
    """A float buffer for chunks of |t|^p, kept per thread across calls: a fresh large
    allocation costs a page fault per 4 KiB on first touch, every prune."""
    need = max(_CHUNK, t[0].numel() if t.dim() else 1)
    work = getattr(_local, "work", None)
    if work is None or work.numel() < need or work.device != t.device:
        work = _local.work = torch.empty(need, device=t.device)
    return work


_CHUNK = 1 << 18  # elements of |t|^p materialised at a time (1 MiB: stays in cache)
_NUMPY_REDUCE_MAX = 1 << 16  # up to this many elements, magnitudes are reduced in numpy (one thread)


def _powered(t: torch.Tensor, p: int, out: torch.Tensor | None = None) -> torch.Tensor:
    t = t.float()
    if out is None:
        return t.abs() if p == 1 else t.pow(p)
    return torch.abs(t, out=out) if p == 1 else torch.pow(t, p, out=out)


def _magnitudes(t: torch.Tensor, p: int) -> dict[int, np.ndarray]:
    """{dim: sum of |t|^p over the other dims} for dims 0 and 1, reading `t` once.

    |t|^p is formed a block of rows at a time inside `_workspace(t)` (cache-sized; whole-tensor
    temporaries cost page faults) and reduced along rows and columns there, then to dim 1
    by a matrix-vector product (torch's strided reductions, e.g. vector_norm over dims
    0/2/3 of a conv weight, are up to 10x slower).
    """
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() <= _NUMPY_REDUCE_MAX:
        # numpy's per-call cost is a fifth of torch's, and most of a thin network's tensors
        # are this small; |t|^p goes into the reused workspace (no fresh allocation per tensor)
        a = t.numpy()
        if a.ndim <= 1:
            return {0: (np.abs(a) if p == 1 else np.power(a, p)).reshape(-1).astype(np.float64)}
        d0, d1 = a.shape[:2]
        work = _workspace(t)[: a.size].numpy().reshape(d0, -1)
        if p == 1:
            np.abs(a.reshape(d0, -1), out=work)
        else:
            np.power(a.reshape(d0, -1), p, out=work)
        k = work.shape[1] // d1  # kernel elements per (row, column)
        cols = work.sum(0) if k == 1 else work.reshape(d0 * d1, k).sum(1).reshape(d0, d1).sum(0)
        return {0: work.sum(1).astype(np.float64), 1: cols.astype(np.float64)}
    if t.dim() <= 1:
        return {0: _powered(t, p).reshape(-1).double().cpu().numpy()}
    d0, d1 = t.shape[:2]
    flat = t.reshape(d0, -1)
    n = flat.shape[1]
    rows = torch.empty(d0, device=t.device)
    cols = torch.zeros(n, device=t.device)
    step = max(1, _CHUNK // n)
    work = _workspace(t)
    for r in range(0, d0, step):
        part = flat[r:r + step]
        a = _powered(part, p, work[: part.numel()].view(part.shape))
        torch.sum(a, 1, out=rows[r:r + step])
        cols += a.sum(0)
    cols = cols.reshape(d1, -1) @ torch.ones(n // d1, device=t.device)
    return {0: rows.double().cpu().numpy(), 1: cols.double().cpu().numpy()}


class BNScaleImportance(Importance):
    """|gamma| of the group's normalisation layers (network slimming); other members ignored."""

    roles = ("norm",)

    def per_index(self, gm: nn.Module, m: Member) -> np.ndarray | None:
        if not m.target.endswith(".weight"):
            return None
        mod = gm.get_submodule(m.module)
        if not isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            return None
        return self.param(gm, m.target).detach().abs().double().numpy()


class LAMPImportance(Importance):
    """LAMP (layer-adaptive magnitude): w_i^2 over the sum of w_j^2 not smaller than it."""

    def per_index(self, gm: nn.Module, m: Member) -> np.ndarray:
        t = self.param(gm, m.target).detach().float()
        dims = [d for d in range(t.dim()) if d != m.dim]
        sq = (t.pow(2).sum(dim=dims) if dims else t.pow(2)).double().numpy()
        order = np.argsort(sq)  # ascending
        tail = np.cumsum(sq[order][::-1])[::-1]  # sum over j >= position
        out = np.empty_like(sq)
        out[order] = sq[order] / (tail + 1e-12)
        return out


class RandomImportance(Importance):
    """Seeded random scores: a baseline."""

    def __init__(self, seed: int = 0):
        super().__init__(normalize=None)
        self.rng = np.random.default_rng(seed)

    def __call__(self, gm: nn.Module, group: ChannelGroup) -> np.ndarray:
        return self.rng.random(group.size)


def _batches(data: Iterable, n: int):
    for i, b in enumerate(data):
        if i >= n:
            return
        yield b


def _xy(batch: Any) -> tuple[tuple, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        return (x if isinstance(x, tuple) else (x,)), y
    return ((batch,) if isinstance(batch, torch.Tensor) else tuple(batch)), None


class TaylorImportance(Importance):
    """First-order Taylor: |sum over a unit's weights of w * dL/dw|, accumulated over batches.

    Args:
        data: iterable of (inputs, labels) batches.
        loss_fn: ``loss_fn(outputs, labels)``; cross-entropy by default.
        batches: how many batches to use.
    """

    def __init__(self, data: Iterable, loss_fn: Callable | None = None, batches: int = 4, **kw: Any):
        super().__init__(**kw)
        self.data, self.batches = data, batches
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self._grads: dict[int, dict[str, torch.Tensor]] = {}

    def _accumulate(self, gm: nn.Module) -> dict[str, torch.Tensor]:
        if id(gm) in self._grads:
            return self._grads[id(gm)]
        was = gm.training
        gm.eval()
        params = dict(gm.named_parameters())
        acc = {k: torch.zeros_like(p) for k, p in params.items()}
        for batch in _batches(self.data, self.batches):
            xs, y = _xy(batch)
            gm.zero_grad(set_to_none=True)
            with torch.enable_grad():
                self.loss_fn(gm(*xs), y).backward()
            for k, p in params.items():
                if p.grad is not None:
                    acc[k] += p.detach() * p.grad.detach()
        gm.zero_grad(set_to_none=True)
        gm.train(was)
        self._grads[id(gm)] = acc
        return acc

    def per_index(self, gm: nn.Module, m: Member) -> np.ndarray:
        wg = self._accumulate(gm)[m.target]
        dims = [d for d in range(wg.dim()) if d != m.dim]
        return (wg.sum(dim=dims) if dims else wg).abs().double().numpy()


def _channel_nodes(gm: fx.GraphModule, group: ChannelGroup, cg: Any, activations_only: bool) -> list[tuple[str, int]]:
    """(node name, dim) of tensors whose dim carries the group's channels one to one."""
    b = cg.builder
    classes = {c for c, u in group.unit_of.items() if (u >= 0).all() and len(sorted_unique(u)) == group.size
               and len(u) == group.size}
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        sp = b.out.get(node)
        if not isinstance(sp, list) or not sp or not isinstance(sp[0], int):
            continue
        if activations_only:
            mod = modules.get(node.target) if node.op == "call_module" else None
            is_act = isinstance(mod, _ACTIVATIONS) or node.target in (torch.relu, nn.functional.relu, nn.functional.gelu)
            if not is_act:
                continue
        for d, s in enumerate(sp):
            if int(cg.class_of[s]) in classes:
                out.append((node.name, d))
    return out


class ActivationImportance(Importance):
    """Mean |activation| ("mean") or APoZ ("apoz": 1 - share of activations <= 0) per unit.

    Read on the group's activation outputs (ReLU, GELU, ...; any tensor of the group when
    it has none) over calibration batches. Needs the coupling graph of `gm` (`cg`).
    """

    def __init__(self, data: Iterable, cg: Any, mode: str = "mean", batches: int = 4):
        super().__init__(normalize=None)
        if mode not in ("mean", "apoz"):
            raise ValueError(f"mode must be 'mean' or 'apoz', got {mode!r}")
        self.data, self.cg, self.mode, self.batches = data, cg, mode, batches

    def __call__(self, gm: fx.GraphModule, group: ChannelGroup) -> np.ndarray:
        where = _channel_nodes(gm, group, self.cg, True) or _channel_nodes(gm, group, self.cg, False)
        if not where:
            return np.zeros(group.size)
        wanted = dict(where)
        sums: dict[str, torch.Tensor] = {}
        mode = self.mode

        class Rec(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n.name in wanted and isinstance(out, torch.Tensor):
                    d = wanted[n.name]
                    red = [i for i in range(out.dim()) if i != d]
                    v = (out.abs().mean(dim=red) if mode == "mean" else (out > 0).float().mean(dim=red))
                    sums[n.name] = sums.get(n.name, 0) + v.double()
                return out

        with torch.inference_mode():
            for batch in _batches(self.data, self.batches):
                Rec(gm).run(*_xy(batch)[0])
        score = np.zeros(group.size)
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, d in where:
            cls = int(self.cg.class_of[self.cg.builder.out[nodes[name]][d]])
            score += np.bincount(group.unit_of[cls], weights=sums[name].numpy(), minlength=group.size)
        return score


class SensitivityImportance(Importance):
    """Loss increase when a unit is removed, measured by making its channels dead.

    Exact for groups that pass no statistic over channels (dead = removed there).
    Costs one forward per unit and batch: for small models or few groups.
    """

    def __init__(self, data: Iterable, loss_fn: Callable | None = None, batches: int = 2):
        super().__init__(normalize=None)
        self.data, self.batches = list(_batches(data, batches)), batches
        self.loss_fn = loss_fn or nn.functional.cross_entropy

    @torch.inference_mode()
    def _loss(self, gm: nn.Module) -> float:
        total = 0.0
        for batch in self.data:
            xs, y = _xy(batch)
            total += float(self.loss_fn(gm(*xs), y))
        return total / max(len(self.data), 1)

    def __call__(self, gm: nn.Module, group: ChannelGroup) -> np.ndarray:
        gm.eval()
        base = self._loss(gm)
        params = [m for m in group.members if m.kind == "param"]
        out = np.zeros(group.size)
        for u in range(group.size):
            saved = []
            with torch.no_grad():
                for m in params:
                    idx = torch.as_tensor(group.channels_of(m, [u]))
                    t = gm.get_parameter(m.target)
                    saved.append((t, m.dim, idx, t.index_select(m.dim, idx).clone()))
                    t.index_fill_(m.dim, idx, 0.0)
            out[u] = self._loss(gm) - base
            with torch.no_grad():
                for t, dim, idx, old in saved:
                    t.index_copy_(dim, idx, old)
        return out


def l1_importance(gm: nn.Module, group: ChannelGroup, cache: dict | None = None) -> np.ndarray:
    """Per-unit L1-magnitude group importance (the default criterion).

    Args:
        cache: a dict reused across the groups of one prune, so that each (tensor, dim)
            reduction runs once even when the tensor sits in many groups (DenseNet).
    """
    crit = cache.setdefault("_l1", MagnitudeImportance(p=1)) if cache is not None else MagnitudeImportance(p=1)
    return crit(gm, group)


def get_importance(spec: str | Callable | None) -> Callable:
    """A criterion from a name ("l1", "l2", "bn", "lamp", "random") or a callable."""
    if spec is None or spec == "l1":
        return MagnitudeImportance(p=1)
    if callable(spec):
        return spec
    table = {
        "l2": lambda: MagnitudeImportance(p=2),
        "bn": BNScaleImportance,
        "lamp": LAMPImportance,
        "random": RandomImportance,
    }
    if spec in ("wanda", "flap"):  # the names users try first; the criteria need batches
        raise ArgumentError(
            f"importance {spec!r} is computed from calibration data: pass an instance, e.g. "
            f"importance=fxslim.passes.calibrated.{'WandaImportance' if spec == 'wanda' else 'FLAPImportance'}"
            "(batches) with batches = fxslim.runtime.text.lm_batches('train', 8) or your own")
    if not isinstance(spec, str) or spec not in table:
        raise ArgumentError(
            f"importance must be one of {['l1', *table]} or a callable (module, group) -> scores, got {spec!r}"
            f"{closest(spec, ['l1', *table]) if isinstance(spec, str) else ''}; data-driven criteria "
            "(TaylorImportance, ActivationImportance, SensitivityImportance; for LLMs calibrated.WandaImportance, "
            "FLAPImportance, LMTaylorImportance) take data: pass an instance")
    return table[spec]()
