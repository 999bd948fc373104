"""Activation-aware importance from calibration data: Wanda and FLAP, for LLM groups.

Magnitude sees only weights. In a trained LLM a few hidden features carry activations
orders of magnitude larger than the rest (outlier features), so a small weight that reads
one of them matters more than a large weight that reads a quiet one. These criteria
weigh each weight by the activations it reads, recorded on calibration batches.

Recording (`record_inputs`): one forward pass over the batches with a forward pre-hook
on every linear layer of the user's model (``nn.Linear``, transformers' ``Conv1D``);
per input feature j of each layer, over
every token (every position of every batch): the count n, ``sum x_j`` and ``sum x_j^2``.
Only these three vectors per layer are kept, never the activations themselves.

Scores, per member of a group that is a linear layer's weight W (out x in; the member's
dim is its input or its output dim), with ``||X_j|| = sqrt(sum x_j^2)``:

* Wanda (Sun et al., 2023) scores a weight ``|W_ij| * ||X_j||``. A consumer column j (the
  member's dim is the input dim) gets ``||X_j|| * sum_i |W_ij|``, a producer row i gets
  ``sum_j |W_ij| * ||X_j||``. By default only consumers count (``roles=("in",)``), the
  structured form FLAP compares against ("Wanda-sp"): a key/value head is scored on its
  o_proj columns, an MLP channel on its down_proj column, a hidden feature on every
  q/k/v/gate/up (and lm_head) column that reads it.
* FLAP's fluctuation (An et al., 2024) scores a consumer column
  ``Var(X_j) * ||W_:j||_2^2`` with ``Var(X_j) = sum x_j^2 / n - (sum x_j / n)^2``: how far
  the column's contribution moves from its mean, i.e. what a constant (its mean, FLAP's
  bias compensation) cannot replace when the column goes.

* first-order Taylor (`LMTaylorImportance`, LLM-Pruner's vector-wise form): a unit's
  members scored ``|sum over its weights of w * dL/dw|``, L the model's own loss on the
  batches (``model(**batch).loss``: the batches carry labels), gradients summed over
  them; every member counts (weights, norms, embeddings). Unlike the hook statistics
  this holds one gradient-sized buffer per parameter.

Members that are not linear weights (biases, norms, embeddings) are not scored; per
member scores are reduced to units, normalised and summed like every criterion
(`fxslim.passes.importance.Importance`). `fxslim.prune` records on the model it is given
before tracing, so the hooks see the user's modules (a `torch.export` capture runs ATen
ops, not modules: pass the user's model, not the capture).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from fxslim._args import _shown, positive_int
from fxslim._inputs import as_inputs
from fxslim.errors import ArgumentError
from fxslim.graph.coupling import Member
from fxslim.passes.importance import Importance

__all__ = ["CalibratedImportance", "FLAPImportance", "LMTaylorImportance", "WandaImportance", "finished", "record_inputs",
           "recording"]

logger = logging.getLogger(__name__)

Stats = dict[str, tuple[int, torch.Tensor, torch.Tensor]]  # module path -> (n, sum x_j, sum x_j^2)


def _in_dim(mod: nn.Module) -> int | None:
    """The dim of `mod.weight` that indexes input features, or None when not a linear layer."""
    if isinstance(mod, nn.Linear):
        return 1
    if type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None:  # transformers: x @ W
        return 0
    return None


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):  # a dict of keyword inputs: labels would only add a loss
        model(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[1], (tuple, list)):
        as_inputs(batch[0]).call(model)  # (inputs, labels), as the training loop reads batches
    else:
        as_inputs(batch).call(model)


@contextmanager
def recording(model: nn.Module) -> Iterator[dict[str, list]]:
    """Hooks on every linear layer of `model` while inside: yields the running sums
    ``{module path: [n, sum x_j, sum x_j^2]}`` that the forward passes run inside add to
    (`finished` turns them into `Stats`). Used by `record_inputs`, and by callers that
    drive the forward passes themselves (``fxslim.passes.llm_calib``: one decoder layer
    at a time)."""
    stats: dict[str, list] = {}
    handles = []
    for path, mod in model.named_modules():
        if _in_dim(mod) is None:
            continue

        def hook(m: nn.Module, args: tuple, path: str = path) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, features)
            s = stats.setdefault(path, [0, 0.0, 0.0])
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + (x * x).sum(0)

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def finished(model: nn.Module, stats: dict[str, list]) -> Stats:
    """`Stats` from the running sums of `recording` (an error when no linear layer ran)."""
    if not stats:
        raise ArgumentError(f"no linear layer of {type(model).__name__} ran on the calibration data: activation-aware "
                            "importance reads the inputs of nn.Linear / Conv1D layers through forward hooks "
                            "(a torch.export capture runs no modules: pass the user's model)")
    return {k: (int(v[0]), v[1], v[2]) for k, v in stats.items()}


@torch.inference_mode()
def record_inputs(model: nn.Module, data: Iterable, batches: int | None = None) -> Stats:
    """Per linear layer of `model` (by module path): (n, sum x_j, sum x_j^2) of its inputs.

    Args:
        model: the model (its train/eval flags are restored; it runs in eval mode).
        data: batches: dicts of keyword inputs (``labels`` dropped), ``(inputs, labels)``
            pairs, tensors or tuples of positional inputs.
        batches: use at most this many.
    """
    modes = [(m, m.training) for m in model.modules()]
    seen = 0
    with recording(model) as stats:
        try:
            model.eval()
            for batch in data:
                if batches is not None and seen >= batches:
                    break
                _call(model, batch)
                seen += 1
        finally:
            for m, mode in modes:
                m.training = mode
    if seen == 0:
        raise ArgumentError("the calibration data is empty: give at least one batch")
    return finished(model, stats)


def _calibration_data(owner: Any, data: Any, batches: int | None) -> Iterable:
    if data is None or isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ArgumentError(f"{type(owner).__name__} needs calibration data: an iterable of batches, e.g. "
                            f"fxslim.runtime.text.lm_batches('train', 8); got {_shown(data)}")
    if batches is not None:
        positive_int("batches", batches)
    return [data] if isinstance(data, (Mapping, torch.Tensor)) else data  # one batch


class CalibratedImportance(Importance):
    """Base of the criteria that read recorded layer inputs (see the module docstring).

    Args:
        data: calibration batches (a list, a DataLoader, `fxslim.runtime.text.lm_batches`).
        batches: how many of them to use (all by default).
        roles: which members count: ``("in",)`` consumers (default), ``("in", "out")`` also
            producer rows (Wanda only).
    """

    def __init__(self, data: Iterable, batches: int | None = None, roles: tuple[str, ...] = ("in",), **kw: Any):
        super().__init__(**kw)
        data = _calibration_data(self, data, batches)
        bad = set(roles) - {"in", "out"}
        if bad or not roles:
            raise ArgumentError(f"roles must be a non-empty tuple of 'in' / 'out', got {roles!r}")
        self.data, self.batches, self.roles = data, batches, tuple(roles)
        self.stats: Stats | None = None
        self._layers: dict[str, list[tuple[str, int]]] = {}  # parameter name -> [(module path, input dim)]

    def calibrate(self, model: nn.Module) -> None:
        """Record `model`'s layer inputs (one pass over the data); `fxslim.prune` calls it."""
        self.use_stats(model, record_inputs(model, self.data, self.batches))

    def use_stats(self, model: nn.Module, stats: Stats) -> None:
        """Score with `stats` recorded on `model` (whose parameter names the groups use)."""
        self.stats = stats
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self._layers = {}
        for path, mod in model.named_modules(remove_duplicate=False):
            d = _in_dim(mod)
            if d is None or path not in self.stats:
                continue
            for name in names.get(id(mod.weight), []):  # tied weights: every name, every use
                self._layers.setdefault(name, []).append((path, d))
        self._cache.clear()

    def __call__(self, gm: nn.Module, group: Any) -> np.ndarray:
        if self.stats is None:
            self.calibrate(gm)
        return super().__call__(gm, group)

    def per_index(self, gm: nn.Module, m: Member) -> np.ndarray | None:
        uses = self._layers.get(m.target)
        if not uses:
            return None
        w = self.param(gm, m.target).detach().double()
        total = None
        for path, in_dim in uses:
            n, s1, s2 = self.stats[path]
            if w.dim() != 2 or s2.numel() != w.shape[in_dim]:
                continue
            v = self.score(w.movedim(in_dim, 1), n, s1.to(w.device), s2.to(w.device), consumer=m.dim == in_dim)
            if v is not None:
                total = v if total is None else total + v
        return None if total is None else total.cpu().numpy()

    def score(self, w: torch.Tensor, n: int, s1: torch.Tensor, s2: torch.Tensor, consumer: bool) -> torch.Tensor | None:
        """Per column (`consumer`) or per row of `w` (out x in) from the input statistics."""
        raise NotImplementedError


class WandaImportance(CalibratedImportance):
    """Wanda: ``|W_ij| * ||X_j||_2`` summed over each unit's weights (consumer columns by
    default, the "Wanda-sp" structured form).

    Example:
        >>> calib = fxslim.runtime.text.lm_batches("train", n_batches=8)
        >>> small = fxslim.prune(model, calib[0], ratio=0.5, importance=WandaImportance(calib))
    """

    def score(self, w, n, s1, s2, consumer):
        a = w.abs() * s2.clamp_min(0).sqrt()  # |W_ij| ||X_j||, rows i, columns j
        return a.sum(0) if consumer else a.sum(1)


class FLAPImportance(CalibratedImportance):
    """FLAP's fluctuation metric ``Var(X_j) * ||W_:j||_2^2`` of consumer columns
    (producer rows are not scored)."""

    def score(self, w, n, s1, s2, consumer):
        if not consumer:
            return None
        var = (s2 / n - (s1 / n) ** 2).clamp_min(0)
        return var * (w * w).sum(0)


def _hf_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ArgumentError("LMTaylorImportance's default loss is the model's own (model(**batch).loss): batches "
                            f"must be dicts with 'labels', got {_shown(batch)}; or pass loss_fn(model, batch)")
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ArgumentError(f"{type(model).__name__}(**batch) returned no loss; pass loss_fn(model, batch)")
    return loss


class LMTaylorImportance(Importance):
    """First-order Taylor ``|sum_unit w * dL/dw|`` with L the model's own loss on
    calibration batches (see the module docstring).

    Args:
        data: batches; by default dicts with ``labels`` (``fxslim.runtime.text.lm_batches``).
        batches: how many to use (all by default).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
    """

    def __init__(self, data: Iterable, batches: int | None = None, loss_fn: Any = None, **kw: Any):
        super().__init__(**kw)
        self.data, self.batches = _calibration_data(self, data, batches), batches
        if loss_fn is not None and not callable(loss_fn):
            raise ArgumentError(f"loss_fn must be callable (model, batch) -> loss, got {_shown(loss_fn)}")
        self.loss_fn = loss_fn or _hf_loss
        self.wg: dict[str, torch.Tensor] | None = None

    def calibrate(self, model: nn.Module) -> None:
        """Sum ``w * dL/dw`` over the batches (parameters' ``.grad`` left untouched)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        acc = [torch.zeros_like(p) for _, p in named]
        modes = [(m, m.training) for m in model.modules()]
        seen = 0
        try:
            model.eval()  # dropout off: the loss of the model as it will run
            for batch in self.data:
                if self.batches is not None and seen >= self.batches:
                    break
                with torch.enable_grad():
                    grads = torch.autograd.grad(self.loss_fn(model, batch), [p for _, p in named], allow_unused=True)
                for a, (_, p), g in zip(acc, named, grads):
                    if g is not None:
                        a += p.detach() * g
                seen += 1
        finally:
            for m, mode in modes:
                m.training = mode
        if seen == 0:
            raise ArgumentError("the calibration data is empty: give at least one batch")
        by_id = {id(p): a for (_, p), a in zip(named, acc)}
        self.wg = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in by_id}
        self._cache.clear()

    def __call__(self, gm: nn.Module, group: Any) -> np.ndarray:
        if self.wg is None:
            self.calibrate(gm)
        return super().__call__(gm, group)

    def per_index(self, gm: nn.Module, m: Member) -> np.ndarray | None:
        wg = self.wg.get(m.target)
        if wg is None:
            return None
        dims = [d for d in range(wg.dim()) if d != m.dim]
        return (wg.sum(dim=dims) if dims else wg).abs().double().cpu().numpy()
