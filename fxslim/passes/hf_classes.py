"""Class-keeping for Hugging Face transformers: the pruned model rebuilt from its config.

A `PreTrainedModel` is more than its modules: ``save_pretrained`` writes ``config.json``
and ``from_pretrained`` builds the model from it, so slicing tensors is not enough, the
config must say the new sizes. This pass finds the config that builds exactly the pruned
tensors and rebuilds ``type(model)(new_config)`` with the sliced state dict, strictly.

Which config field sizes which tensor dim is not guessed from names: each size field
(`SIZE_FIELDS`, through the config's own ``attribute_map``: ``n_embd``, ``dim`` ...) is
doubled in turn and the model is built on the meta device (no memory, milliseconds); the
dims that change are the ones the field sizes, linearly (``q_proj`` rows = heads x
head_dim). Fields computed from others when unset (``head_dim``, GPT-2's ``n_inner``) are
written out first, so that pruning heads leaves head_dim as it is. A field that sizes a
dim alone is solved from the pruned size; every dim it sizes must give the same value,
else the layers were pruned unevenly, which one HF config cannot express. A field that
sizes no dim alone (BERT's head count: its q/k/v width is the hidden size) is tried at
its old value and at the ratios the solved fields moved by. A candidate counts only
when the meta build has exactly the pruned shapes and the rebuilt model's outputs equal
the pruned graph's (`fxslim.passes.keep_classes`).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["EXPLICIT_FIELDS", "SIZE_FIELDS", "config_candidates", "rebuild_pretrained"]

# config fields that size tensors (canonical names; the config's attribute_map maps aliases)
SIZE_FIELDS = ("hidden_size", "intermediate_size", "n_inner", "hidden_dim", "ffn_dim",
               "num_attention_heads", "num_key_value_heads")

# fields a model derives from others when unset: written out so that they stay fixed
EXPLICIT_FIELDS: dict[str, Callable[[Any], int]] = {
    "head_dim": lambda c: c.hidden_size // c.num_attention_heads,  # heads go, head_dim stays
    "n_inner": lambda c: 4 * c.hidden_size,  # GPT-2's MLP width
    "num_key_value_heads": lambda c: c.num_attention_heads,
}


class ConfigMismatch(Exception):
    """Internal: no config builds the pruned shapes (the message says why)."""


def _shapes(cls: type, cfg: Any) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = cls(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _with(cfg: Any, **values: int) -> Any:
    new = copy.deepcopy(cfg)
    for k, v in values.items():
        setattr(new, k, v)
    return new


def config_candidates(model: nn.Module, target: dict[str, tuple[int, ...]]) -> Iterator[Any]:
    """Configs whose `type(model)` builds exactly the `target` state-dict shapes.

    Raises:
        ConfigMismatch: the pruned sizes differ between layers of one type, or no size
            field explains a changed dim.
    """
    cls, cfg0 = type(model), copy.deepcopy(model.config)
    for name, derive in EXPLICIT_FIELDS.items():
        if hasattr(cfg0, name) and getattr(cfg0, name) is None:
            try:
                setattr(cfg0, name, derive(cfg0))
            except (AttributeError, TypeError, ZeroDivisionError):
                pass
    base = _shapes(cls, cfg0)
    if set(base) != set(target):
        raise ConfigMismatch(f"{cls.__name__}(config) has other tensors than the model "
                             f"(e.g. {sorted(set(base) ^ set(target))[:3]})")
    fields = [f for f in SIZE_FIELDS if isinstance(getattr(cfg0, f, None), int) and not isinstance(getattr(cfg0, f), bool)]
    sized: dict[str, dict[tuple[str, int], tuple[int, int]]] = {}
    for f in fields:
        f0 = getattr(cfg0, f)
        try:
            probe = _shapes(cls, _with(cfg0, **{f: 2 * f0}))
        except Exception as exc:  # noqa: BLE001 - a config the model class refuses: the field cannot be probed
            logger.debug("%s cannot be built with %s doubled: %s", cls.__name__, f, exc)
            continue
        sized[f] = {(k, d): (base[k][d], probe[k][d]) for k in base for d in range(len(base[k]))
                    if probe.get(k, base[k])[d:d + 1] != base[k][d:d + 1]}
    owners: dict[tuple[str, int], list[str]] = {}
    for f, dims in sized.items():
        for kd in dims:
            owners.setdefault(kd, []).append(f)
    solved: dict[str, int] = {}
    for f, dims in sized.items():
        f0, seen = getattr(cfg0, f), {}
        for (k, d), (s0, s2) in dims.items():
            if owners[(k, d)] != [f] or s2 == s0:
                continue
            value = f0 + (target[k][d] - s0) * f0 / (s2 - s0)
            seen.setdefault(value, f"{k} dim {d}")
        if len(seen) > 1:
            (v1, where1), (v2, where2) = list(seen.items())[:2]
            raise ConfigMismatch(
                f"the pruned model has {f} = {v1:g} at {where1} but {v2:g} at {where2}: one HF config cannot "
                "express per-layer sizes; prune with one ratio per layer type (fxslim.prune(model, x, ratio), "
                "without global_ranking, threshold or overrides), or keep_classes=False for the GraphModule")
        if seen:
            value = next(iter(seen))
            if value != int(value) or value < 1:
                raise ConfigMismatch(f"{f} would be {value:g} at {next(iter(seen.values()))}")
            solved[f] = int(value)
    changed = [k for k in base if base[k] != target[k]]
    free = [f for f in fields if f not in solved]
    ratios = sorted({solved[f] / getattr(cfg0, f) for f in solved} - {1.0})
    options = [sorted({getattr(cfg0, f)} | {round(getattr(cfg0, f) * r) for r in ratios} - {0}) for f in free]
    explained = False
    for combo in itertools.product(*options):
        cfg = _with(cfg0, **solved, **dict(zip(free, combo)))
        try:
            if _shapes(cls, cfg) != target:
                continue
        except Exception as exc:  # noqa: BLE001 - e.g. hidden size not divisible by the head count
            logger.debug("%s cannot be built with %s: %s", cls.__name__, combo, exc)
            continue
        explained = True
        yield cfg
    if not explained:
        raise ConfigMismatch(f"no {type(cfg0).__name__} builds the pruned shapes (first changed: "
                             f"{changed[0] if changed else '-'} {target.get(changed[0]) if changed else ''})")


def rebuild_pretrained(model: nn.Module, generic: nn.Module, cfg: Any) -> nn.Module:
    """``type(model)(cfg)`` holding `generic`'s tensors (loaded strictly; ties, dtypes,
    devices, requires_grad and train/eval flags as in `generic`)."""
    state = generic.state_dict()
    first = next(iter(generic.parameters()))
    with torch.device(first.device):
        new = type(model)(cfg).to(first.dtype)
    if hasattr(model, "generation_config") and model.generation_config is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.load_state_dict(state, strict=True)  # copies: tied tensors stay one tensor
    mine = new.state_dict()
    bad = [k for k, v in state.items() if mine[k].dtype != v.dtype or not torch.equal(mine[k], v)]
    if bad:
        raise ConfigMismatch(f"the rebuilt {type(model).__name__} does not hold the pruned tensors {bad[:3]}")
    flags = dict(generic.named_modules())
    for path, mod in new.named_modules():
        if path in flags:
            mod.training = flags[path].training
    grads = dict(generic.named_parameters())
    for name, p in new.named_parameters():
        if name in grads:
            p.requires_grad_(grads[name].requires_grad)
    return new
