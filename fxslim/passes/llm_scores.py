"""Importance of an LLM checkpoint's head and MLP groups, read one decoder layer at a time.

The criteria are the in-memory ones (`fxslim.passes.importance.MagnitudeImportance`,
`fxslim.passes.calibrated.WandaImportance` / `FLAPImportance`) called on the same channel
groups; only where the weights come from differs. A group's members all lie in one
decoder layer, so each layer's tensors are read from the shards, scored and dropped:

* magnitude reads the layer's projection weights and scores them as they are stored;
* activation-aware scores need each layer's inputs on calibration tokens. The tokens
  are embedded once; then per layer, the layer is built from its meta twin with the
  weights from the shards (in `dtype`: float32 by default, since CPUs without bf16
  matrix units run bf16 matmuls far slower), the cached hidden states of every batch run
  through it under the recording hooks (`fxslim.passes.calibrated.recording`), the
  layer's groups are scored, and its outputs become the next layer's inputs. Each batch
  sees the calls the whole model would make (positions, causal mask and rotary
  embeddings from the model's own modules), so on a float32 checkpoint the statistics
  equal those of the model in memory.

Peak memory: one layer's weights plus the hidden states of all batches
(tokens x hidden_size x 4 bytes, 64 MiB for 4096 tokens of a 4096-wide model).
"""

from __future__ import annotations

import copy
import ctypes
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxslim.errors import PlanMismatchError, UnsupportedOpError
from fxslim.graph.coupling import ChannelGroup
from fxslim.passes._shards import TensorEntry, read_tensor
from fxslim.passes.calibrated import CalibratedImportance, finished, recording
from fxslim.passes.llm_plan import DecoderGroups

__all__ = ["calibrated_scores", "magnitude_scores", "trim_heap"]

Progress = Callable[[int], None]  # called with the layer just done


class _Loaded:
    """Tensors by parameter name, as criteria read them (``named_parameters``)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(
        self, remove_duplicate: bool = False
    ) -> Iterable[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())


def _read(entries: Mapping[str, TensorEntry], name: str) -> torch.Tensor:
    if name not in entries:
        raise PlanMismatchError(
            f"the checkpoint has no tensor {name}, which its config's model has"
        )
    return read_tensor(entries[name])


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks under 32 MiB in its
    arenas: the capture's graph and each layer's temporaries would otherwise stay resident)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _members(groups: Iterable[ChannelGroup]) -> list[str]:
    return list(dict.fromkeys(m.target for g in groups for m in g.members if m.kind == "param"))


def magnitude_scores(
    entries: Mapping[str, TensorEntry],
    dg: DecoderGroups,
    crit: Any,
    progress: Progress | None = None,
) -> dict[int, np.ndarray]:
    """{group id: scores} of every head and MLP group, one layer's tensors in memory at a time."""
    scores = {}
    crit.reset()
    for i, pair in enumerate(zip(dg.heads, dg.mlp)):
        loaded = _Loaded({name: _read(entries, name) for name in _members(pair)})
        for g in pair:
            scores[g.id] = np.asarray(crit(loaded, g), dtype=np.float64)
        crit.reset()  # the criterion's cache holds the layer's tensors
        del loaded
        trim_heap()
        if progress:
            progress(i)
    return scores


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    need = ("embed_tokens", "layers", "rotary_emb")
    if base is None or not all(hasattr(base, a) for a in need):
        raise UnsupportedOpError(
            f"{type(model).__name__}: activation-aware streaming runs Llama-shaped decoders "
            f"(embed_tokens, layers, rotary_emb); use importance='magnitude'"
        )
    kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise UnsupportedOpError(
            f"{type(model).__name__} has {sorted(kinds)} attention layers: activation-aware "
            "streaming runs full-attention layers only; use importance='magnitude'"
        )
    return base


def _nested(prefix: str, i: int, layer: nn.Module) -> nn.Module:
    """A root module under which `layer` has its full path (``model.layers.3``), so the
    recorded statistics and parameter names are the ones the groups name."""
    root = node = nn.Module()
    *parents, last = prefix.split(".")
    for p in parents:
        child = nn.Module()
        node.add_module(p, child)
        node = child
    node.add_module(last, nn.ModuleDict({str(i): layer}))
    return root


@torch.no_grad()  # not inference_mode: the criteria's caches read tensors' version counters
def calibrated_scores(
    model: nn.Module,
    entries: Mapping[str, TensorEntry],
    dg: DecoderGroups,
    crit: CalibratedImportance,
    batches: list[torch.Tensor],
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
) -> dict[int, np.ndarray]:
    """{group id: scores} from calibration token batches ((batch, seq) ids each), one
    decoder layer in memory at a time (see the module docstring). `model` is the meta twin."""
    from transformers.masking_utils import create_causal_mask

    base = _decoder(model)
    cfg = model.config
    name = f"{dg.prefix.rsplit('.', 1)[0]}.embed_tokens.weight"
    if name not in entries:
        raise PlanMismatchError(
            f"the checkpoint has no tensor {name}, which its config's model has"
        )
    # only the rows of the tokens that occur are read (a 128k vocabulary is 1 GiB in bf16):
    # the lookup is a gather, so gathering from those rows gives the same hidden states
    used, where = torch.unique(torch.cat([b.reshape(-1) for b in batches]), return_inverse=True)
    rows = torch.cat([read_tensor(entries[name], slice(i, i + 1)) for i in used.tolist()]).to(dtype)
    where = where.split([b.numel() for b in batches])
    rotary = type(base.rotary_emb)(config=cfg).to(
        dtype if dtype == torch.float64 else torch.float32
    )
    hidden, calls = [], []
    for ids, at in zip(batches, where):
        h = F.embedding(at.reshape(ids.shape), rows)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        mask = create_causal_mask(
            config=cfg, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos
        )
        hidden.append(h)
        calls.append(
            {
                "attention_mask": mask,
                "position_ids": pos,
                "position_embeddings": rotary(h, position_ids=pos),
            }
        )
    del rows
    scores = {}
    for i, pair in enumerate(zip(dg.heads, dg.mlp)):
        layer = copy.deepcopy(base.layers[i])  # meta: no memory
        path = f"{dg.prefix}.{i}."
        state = {n: _read(entries, path + n).to(dtype) for n, _ in layer.named_parameters()}
        layer.load_state_dict(state, assign=True)
        del state
        root = _nested(dg.prefix, i, layer.eval())
        with recording(root) as raw:
            hidden = [layer(h, **kw) for h, kw in zip(hidden, calls)]
        read = {m.target for g in pair for m in crit.members(g)}  # e.g. o_proj and down_proj only
        for name, p in root.named_parameters():
            if name not in read:
                p.data = torch.empty(0, dtype=p.dtype)  # freed before the scores' float64 copies
        crit.use_stats(root, finished(root, raw))
        for g in pair:
            scores[g.id] = np.asarray(crit(root, g), dtype=np.float64)
        crit.reset()
        del layer, root
        trim_heap()
        if progress:
            progress(i)
    return scores
