"""FLAP's bias compensation: a removed input column's mean contribution, kept as a bias.

A linear layer ``y = W x + b`` that loses the input columns R (heads before o_proj, MLP
channels before down_proj, hidden features before q/k/v/gate/up) computes
``W_K x_K + b`` instead. Over the calibration tokens the removed part ``W_R x_R`` has the
mean ``W_R E[x_R]``; adding it to the bias (An et al., 2024, "baseline bias
compensation") leaves only ``W_R (x_R - E[x_R])``, the fluctuation `FLAPImportance` ranks
by. Exact when the removed inputs are constant on the data; a first-order correction
otherwise (for hidden features the kept inputs also change, since RMSNorm/LayerNorm
statistics run over fewer features: on the built-in tiny Llama at 0.5x parameters,
compensating only o_proj and down_proj helps, compensating q/k/v/gate/up too hurts;
bench/README.md).

The means come from the statistics `record_inputs` keeps for every linear layer of the
original model (``CalibratedImportance.stats`` after a prune, or a fresh record). A layer
without a bias gets one: a Hugging Face model is rebuilt from its config with the bias
flags that create it (``attention_bias``, ``mlp_bias``: zero biases elsewhere, so the
model is unchanged but for the compensation, and it reloads with ``from_pretrained``); a
plain ``nn.Linear`` gets a bias parameter. Layers whose class cannot hold one are left
as they are and named in the log.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from fxslim._args import check_module
from fxslim.errors import ArgumentError
from fxslim.passes.calibrated import Stats, record_inputs
from fxslim.utils import META_ATTR, fxslim_meta

__all__ = ["BIAS_FLAGS", "compensate_bias"]

logger = logging.getLogger(__name__)

BIAS_FLAGS = ("attention_bias", "mlp_bias")  # HF config flags that give projections biases


def _deltas(model: nn.Module, small: nn.Module, stats: Stats) -> dict[str, torch.Tensor]:
    """{module path: W_R E[x_R] on the kept output rows} for every linear layer that lost inputs."""
    keep = fxslim_meta(small).get("fxslim_keep") or {}
    mods = dict(model.named_modules())
    out = {}
    for path, mod in small.named_modules():
        if not isinstance(mod, nn.Linear) or path not in stats or f"{path}.weight:1" not in keep:
            continue
        w = mods[path].weight.detach().double()
        n, s1, _ = stats[path]
        gone = np.setdiff1d(np.arange(w.shape[1]), keep[f"{path}.weight:1"])
        rows = keep.get(f"{path}.weight:0", np.arange(w.shape[0]))
        if len(gone):
            idx, r = torch.as_tensor(gone), torch.as_tensor(rows)
            out[path] = (w[r][:, idx] @ (s1[idx] / n)).to(mod.weight.dtype)
    return out


def _with_biases(small: nn.Module, need: list[str]) -> nn.Module:
    """`small` rebuilt from its config with the bias flags that give `need` a bias (HF)."""
    cfg = copy.deepcopy(small.config)
    for flag in BIAS_FLAGS:
        if hasattr(cfg, flag) and not getattr(cfg, flag):
            setattr(cfg, flag, True)
    with torch.device("meta"):
        probe = type(small)(cfg)
    have = {n for n, _ in probe.named_parameters()}
    state = small.state_dict()
    if not any(f"{p}.bias" in have for p in need):
        return small
    new = type(small)(cfg).to(next(small.parameters()).dtype)
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise ArgumentError(f"{type(small).__name__} with {BIAS_FLAGS} set is not the pruned model plus biases "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for k in missing:
            new.get_parameter(k).zero_()
    new.train(small.training)
    if getattr(small, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(small.generation_config)
    return new


def compensate_bias(model: nn.Module, small: nn.Module, stats: Stats | None = None, data: Iterable | None = None,
                    batches: int | None = None, layers: Iterable[str] | None = None) -> nn.Module:
    """`small` (pruned from `model` by fxslim, in its own classes) with each linear layer's
    removed input columns replaced by their mean contribution (see the module docstring).

    Args:
        model: the original model.
        small: the pruned model (`fxslim.prune`'s result, kept as the user's classes).
        stats: `record_inputs(model, ...)` (e.g. ``FLAPImportance(...).stats`` after the
            prune); else recorded now from `data` (at most `batches`).
        layers: which layers to compensate, by module path or its last name (e.g.
            ``["o_proj", "down_proj"]``: FLAP's heads and MLP channels); default every
            linear layer that lost input columns.

    Returns:
        A new model (`small` is not changed).

    Example:
        >>> flap = FLAPImportance(calib)
        >>> small = compensate_bias(model, fxslim.prune(model, x, 0.5, importance=flap), flap.stats)
    """
    check_module("model", model)
    check_module("small", small)
    if not fxslim_meta(small).get("fxslim_keep"):
        raise ArgumentError("small carries no fxslim record of kept channels: give the model fxslim.prune returned")
    if stats is None:
        if data is None:
            raise ArgumentError("compensate_bias needs the original's input statistics: stats= or calibration data=")
        stats = record_inputs(model, data, batches)
    deltas = _deltas(model, small, stats)
    if layers is not None:
        names = {layers} if isinstance(layers, str) else set(layers)
        deltas = {p: d for p, d in deltas.items() if p in names or p.rsplit(".", 1)[-1] in names}
    need = [p for p in deltas if getattr(small.get_submodule(p), "bias", None) is None]
    new = _with_biases(small, need) if need and hasattr(small, "config") else copy.deepcopy(small)
    if new is small:
        new = copy.deepcopy(small)
    setattr(new, META_ATTR, copy.deepcopy(fxslim_meta(small)))
    skipped = []
    with torch.no_grad():
        for path, delta in deltas.items():
            mod = new.get_submodule(path)
            if mod.bias is not None:
                mod.bias += delta
            elif hasattr(new, "config"):
                skipped.append(path)  # no config flag gives it a bias: a plain one would not reload
            else:
                mod.bias = nn.Parameter(delta.clone())
    if skipped:
        logger.info("no bias compensation for %d layers whose class holds no bias (e.g. '%s')", len(skipped), skipped[0])
    return new
