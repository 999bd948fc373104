"""The pruning plan of a decoder-only LLM checkpoint, computed without its weights.

The model is built from the checkpoint's ``config.json`` on the meta device (shapes, no
memory) and captured there like any model (`fxslim.channel_groups`), so the channel
groups, their members and unit layouts are the ones `fxslim.prune` uses in memory.
Per decoder layer two groups are pruned: the attention heads (units are key/value heads,
each with its query heads: q/k/v rows and o_proj columns go together, which is grouped
query attention when ``num_key_value_heads < num_attention_heads``) and the MLP channels
(gate/up rows, down_proj columns). The hidden size stays (its group is ignored through
``model.embed_tokens``, as ``ignore=`` does in memory).

How many units go is the in-memory policy (`fxslim.passes.policy.allocate`) with
per-module overrides: ``heads`` of each layer's head group (its ``o_proj``), ``mlp`` of
each MLP group (its ``down_proj``), floored, at least one unit kept; which go is the
lowest scores. The new config is the one whose meta build has exactly the pruned shapes
(`fxslim.passes.hf_classes.config_candidates`). The plan itself is small: per changed
tensor, the kept indices along one dim.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxslim.errors import PlanMismatchError, SaveLoadError, UnsupportedOpError
from fxslim.graph.analysis import channel_groups
from fxslim.graph.coupling import ChannelGroup
from fxslim.passes.hf_classes import ConfigMismatch, config_candidates
from fxslim.passes.policy import Policy, allocate
from fxslim.passes.prune import make_plan

__all__ = [
    "DecoderGroups",
    "LLMPlan",
    "decoder_groups",
    "llm_overrides",
    "loadable_config",
    "make_llm_plan",
    "meta_model",
]

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^(.*\.layers)\.(\d+)\.")
IGNORE = ("model.embed_tokens",)  # the hidden size stays


def meta_model(folder: Path) -> nn.Module:
    """The causal LM of checkpoint `folder` built from its config on the meta device."""
    import transformers as T

    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
        cfg = T.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise SaveLoadError(
            f"{path} is not a readable Hugging Face config ({type(exc).__name__}: {exc})"
        ) from exc
    try:
        with torch.device("meta"):
            model = T.AutoModelForCausalLM.from_config(cfg)
    except ValueError as exc:
        raise UnsupportedOpError(
            f"{folder}: model_type {raw.get('model_type')!r} is not a causal LM transformers "
            f"can build ({exc})"
        ) from exc
    return model.eval()


@dataclass
class DecoderGroups:
    """The capture's groups and, per decoder layer, its head and MLP group."""

    groups: list[ChannelGroup]
    heads: list[ChannelGroup]
    mlp: list[ChannelGroup]
    prefix: str  # e.g. "model.layers"


def _layer_of(group: ChannelGroup, suffix: str) -> tuple[str, int] | None:
    for m in group.members:
        if (
            m.kind == "param"
            and m.role == "in"
            and m.target.endswith(suffix)
            and (hit := _LAYER.match(m.target))
        ):
            return hit.group(1), int(hit.group(2))
    return None


# a few recent captures, by class and config
_CAPTURED: dict[tuple[str, str], list[ChannelGroup]] = {}


def decoder_groups(model: nn.Module) -> DecoderGroups:
    """Capture the meta `model` and find each layer's head and MLP group (a capture
    depends only on the class and config: the last few are kept for repeated runs).

    Raises:
        UnsupportedOpError: a layer lacks a prunable head or MLP group (the message says which).
    """
    key = (type(model).__name__, model.config.to_json_string())
    groups = _CAPTURED.get(key)
    if groups is None:
        x = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}
        groups = _CAPTURED[key] = channel_groups(model, x)
        while len(_CAPTURED) > 4:
            _CAPTURED.pop(next(iter(_CAPTURED)))
    n = model.config.num_hidden_layers
    found: dict[str, dict[int, ChannelGroup]] = {"heads": {}, "mlp": {}}
    prefix = None
    for g in groups:
        for kind, suffix in (("heads", "self_attn.o_proj.weight"), ("mlp", "mlp.down_proj.weight")):
            hit = _layer_of(g, suffix) if g.prunable else None
            if hit:
                prefix = hit[0]
                found[kind][hit[1]] = g
    for kind, by_layer in found.items():
        missing = [i for i in range(n) if i not in by_layer]
        if missing:
            raise UnsupportedOpError(
                f"{type(model).__name__}: no prunable {kind} group in decoder layer(s) {missing[:5]} (streamed "
                "pruning expects Llama-shaped layers: self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj); "
                "`fxslim groups` shows what the capture found"
            )
    return DecoderGroups(
        groups, [found["heads"][i] for i in range(n)], [found["mlp"][i] for i in range(n)], prefix
    )


def llm_overrides(prefix: str, layers: int, heads: float, mlp: float) -> dict[str, float]:
    """The per-module ratios of a heads/MLP prune (the same dict serves ``fxslim.prune``)."""
    out = {f"{prefix}.{i}.self_attn.o_proj": heads for i in range(layers)}
    return out | {f"{prefix}.{i}.mlp.down_proj": mlp for i in range(layers)}


@dataclass
class LLMPlan:
    """What a streamed prune keeps.

    Attributes:
        keep: tensor name -> [(dim, kept indices)] for every tensor that changes.
        config: the config of the pruned model.
        rows: per layer (index, kv heads, kv heads kept, MLP channels, kept).
    """

    keep: dict[str, list[tuple[int, np.ndarray]]]
    config: Any
    rows: list[tuple[int, int, int, int, int]]

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The pruned shape of tensor `name` of `shape`."""
        out = list(shape)
        for dim, kept in self.keep.get(name, ()):
            out[dim] = len(kept)
        return tuple(out)


def _refused(config: Any) -> str | None:
    """Why transformers would refuse to load `config` (its class validators), or None."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception as exc:  # noqa: BLE001 - transformers' validation errors have no common type
        return str(getattr(exc, "__cause__", None) or exc).strip().splitlines()[0]
    return None


def loadable_config(config: Any, target: dict[str, tuple[int, ...]]) -> Any:
    """`config`, or an equivalent one transformers loads.

    transformers' ``LlamaConfig`` refuses a hidden size that is not a multiple of the
    head count even when ``head_dim`` is explicit, so a Llama with 24 of its 32 heads
    (hidden 4096) saves but never loads. ``MistralConfig`` accepts it, and a Mistral
    decoder without a sliding window is a Llama decoder without biases, tensor for tensor
    (the same names, shapes and ops); that config is used then (logged), and its meta
    build must have exactly the pruned shapes.
    """
    import transformers as T

    why = _refused(config)
    if why is None:
        return config
    d = config.to_dict()
    if d.get("model_type") != "llama" or d.get("attention_bias") or d.get("mlp_bias"):
        raise PlanMismatchError(f"transformers refuses the pruned {type(config).__name__}: {why}")
    for k in (
        "model_type",
        "architectures",
        "attention_bias",
        "mlp_bias",
        "pretraining_tp",
        "transformers_version",
    ):
        d.pop(k, None)
    new = T.MistralConfig(**d, sliding_window=None)
    new.architectures = ["MistralForCausalLM"]
    with torch.device("meta"):
        built = T.MistralForCausalLM(new)
    shapes = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    if shapes != target or _refused(new):
        raise PlanMismatchError(
            f"transformers refuses the pruned {type(config).__name__} ({why}) and no "
            "MistralConfig builds the same tensors"
        )
    logger.warning(
        "transformers refuses the pruned LlamaConfig (%s): written as MistralForCausalLM, the same "
        "decoder (no biases, no sliding window), tensor for tensor",
        why,
    )
    return new


class _Groups:
    def __init__(self, groups: list[ChannelGroup]):
        self.groups = groups


def make_llm_plan(
    model: nn.Module, dg: DecoderGroups, scores: dict[int, np.ndarray], heads: float, mlp: float
) -> LLMPlan:
    """The plan from per-group `scores` (group id -> one score per unit)."""
    n = len(dg.heads)
    policy = Policy(ratio=0.0, overrides=llm_overrides(dg.prefix, n, heads, mlp), ignore=IGNORE)
    cg = _Groups(dg.groups)
    plan = make_plan(cg, allocate(cg, scores, policy))
    keep: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (target, dim), kept in plan.keep.items():
        keep.setdefault(target, []).append((dim, kept))
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    target = {k: LLMPlan(keep, None, []).shape(k, s) for k, s in target.items()}
    try:
        config = next(config_candidates(model, target))
    except ConfigMismatch as exc:
        raise PlanMismatchError(f"the pruned {type(model).__name__} has no config: {exc}") from exc
    config = loadable_config(config, target)
    gone = plan.removed
    rows = [
        (i, h.size, h.size - len(gone.get(h.id, ())), m.size, m.size - len(gone.get(m.id, ())))
        for i, (h, m) in enumerate(zip(dg.heads, dg.mlp))
    ]
    return LLMPlan(keep, config, rows)
