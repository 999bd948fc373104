"""Depth pruning: remove whole residual blocks, ranked by block influence.

A residual block maps its stream ``h`` to ``h' = h + f(h)``. Its block influence
(ShortGPT, Men et al. 2024) is

    BI = 1 - mean_t cos(h_t, h'_t),

the mean over calibration positions ``t``: tokens for a (batch, tokens, features) stream,
whole examples otherwise. A block whose output points where its input did adds little;
removing it (``h' := h``) changes the stream least, so the lowest scores go first.

Which blocks: lists of blocks (`nn.ModuleList` or `nn.Sequential` of two or more modules of
one class: a decoder's layers, a ViT's blocks, a ResNet stage), by module path (`blocks=`)
or, when not given, every such list not inside another. Only a block whose output has its
input's shape can go (a ResNet stage's downsampling block stays).

The rewrite keeps the user's classes: a copy of the model whose lists lose the blocks (the
user's model is untouched; the copy's tensors are its own, so training it leaves the
original as it was). A Hugging Face model's config says the new depth
(``num_hidden_layers``, through the config's ``attribute_map``), its per-layer lists
(``layer_types``) lose the same entries, and every kept layer's ``layer_idx`` (the KV
cache's index) is renumbered, so ``generate()``, ``save_pretrained()`` and
``from_pretrained()`` work.

Proof: the copy runs on the calibration batches next to the original with the removed
blocks made identities by forward hooks; every output must agree (within 1e-4 of its scale). A
forward that indexes its list by position, or reads the depth from something the rewrite
does not update, fails that with a typed error instead of returning a different model. A
Hugging Face model is also built again from its new config with its weights, as
``from_pretrained`` will, and must compute the same: a layer that sets state from its
position when built (GPT-2's ``scale_attn_by_inverse_layer_idx``) would reload differently,
and is refused.

Example:
    >>> res = fxslim.prune_depth(model, calib, n_remove=2)
    >>> res.removed, res.model.config.num_hidden_layers
    (['model.layers.4', 'model.layers.2'], 4)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxslim._args import check_module, fraction, module_paths
from fxslim._inputs import as_inputs
from fxslim.errors import ArgumentError, PassContractError
from fxslim.passes.verify import max_scaled_diff
from fxslim.utils import META_ATTR

__all__ = ["DepthResult", "block_influence", "block_lists", "prune_depth"]

logger = logging.getLogger(__name__)

TOL = 1e-4  # max |difference| / max |output|
_LISTS = (nn.ModuleList, nn.Sequential)


@dataclass
class DepthResult:
    """What `prune_depth` returns.

    Attributes:
        model: the copy without the removed blocks (the user's classes).
        removed: module paths (in the original) of the removed blocks, lowest score first.
        scores: block influence of every block of the lists, by module path.
        blocks: the block lists' module paths.
        fixed: blocks that could not go (their output's shape differs from their input's).
    """

    model: nn.Module
    removed: list[str]
    scores: dict[str, float]
    blocks: list[str]
    fixed: list[str]


def block_lists(model: nn.Module) -> list[str]:
    """Module paths of the model's outermost lists of two or more blocks of one class."""
    found: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, _LISTS) or len(mod) < 2:
            continue
        if len({type(m) for m in mod}) != 1 or isinstance(mod[0], _LISTS):
            continue
        if any(name.startswith(f + ".") for f in found):
            continue
        found.append(name)
    return found


def _stream_in(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def _stream_out(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _cosines(h: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    if h.dim() == 3:  # (batch, tokens, features): one cosine per token
        a, b = h.reshape(-1, h.shape[-1]), h2.reshape(-1, h2.shape[-1])
    else:
        a, b = h.reshape(h.shape[0], -1), h2.reshape(h2.shape[0], -1)
    return nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def block_influence(model: nn.Module, calib: Iterable[Any], blocks: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """Block influence of every block of the lists at `blocks`, and the blocks that change shape.

    Args:
        model: the model (run in eval mode, without gradients; its mode is restored).
        calib: calibration batches, each in any form `fxslim.prune` accepts as inputs.
        blocks: module paths of block lists.
    """
    sums: dict[str, list[float]] = {}
    fixed: set[str] = set()
    handles = []

    def hooks(path: str, block: nn.Module) -> None:
        def post(mod, args, kwargs, output):
            h, h2 = _stream_in(args, kwargs), _stream_out(output)
            if h is None or h2 is None or h.shape != h2.shape:
                fixed.add(path)
                return
            c = _cosines(h, h2)
            acc = sums.setdefault(path, [0.0, 0])
            acc[0] += float(c.sum())
            acc[1] += c.numel()

        handles.append(block.register_forward_hook(post, with_kwargs=True))

    for lst in blocks:
        for i, block in enumerate(model.get_submodule(lst)):
            hooks(f"{lst}.{i}", block)
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in calib:
                xs = as_inputs(batch)
                try:
                    xs.call(model)
                except Exception as exc:  # the user's batch does not fit the model: say which
                    raise ArgumentError(f"calib batch {n} {xs.describe()} does not run the model: "
                                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
                n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ArgumentError("calib holds no batches: block influence needs at least one")
    scores = {p: 1.0 - s / max(c, 1) for p, (s, c) in sums.items()}
    return scores, sorted(fixed)


def _config_depth(model: nn.Module, lst: str, old: int, keep: list[int]) -> None:
    """Bring a Hugging Face config in line with `keep` when its depth counts this list."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) != old:
        return
    config.num_hidden_layers = len(keep)
    for key, value in list(vars(config).items()):  # per-layer lists: layer_types ...
        if "layer" in key and isinstance(value, list) and len(value) == old:
            setattr(config, key, [value[i] for i in keep])
    for new, block in enumerate(model.get_submodule(lst)):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new  # the KV cache's index of the layer


def _check_reload(model: nn.Module, calib: list[Any]) -> None:
    """A Hugging Face model built from its config, with its weights, must compute what it
    computes (``from_pretrained`` does just that): sizes and per-layer state set at build time."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        return
    fresh = type(model)(copy.deepcopy(config))
    try:
        fresh.load_state_dict(model.state_dict())
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors
        raise PassContractError(
            f"the depth-pruned {type(model).__name__}'s config does not build its layers "
            f"({str(exc).splitlines()[0]}): its depth is not one num_hidden_layers can say"
        ) from exc
    diff = _worst_diff(fresh.eval(), model.eval(), calib)
    if diff > TOL:
        raise PassContractError(
            f"the depth-pruned {type(model).__name__} would reload differently: built from its "
            f"config (as from_pretrained does) its outputs differ by {diff:.2e} of their scale (a "
            "layer sets state from its position when built, e.g. GPT-2's scale_attn_by_inverse_layer_idx)"
        )


def _worst_diff(want: nn.Module, got: nn.Module, calib: list[Any]) -> float:
    """`max_scaled_diff` of the two models' outputs, worst over (up to) two batches."""
    with torch.no_grad():
        return max(max_scaled_diff(as_inputs(b).call(want), as_inputs(b).call(got)) for b in calib[:2])


def _identities(model: nn.Module, removed: list[str]) -> list:
    def same(mod, args, kwargs, output):
        h = _stream_in(args, kwargs)
        return h if isinstance(output, torch.Tensor) else (h, *output[1:])

    return [model.get_submodule(p).register_forward_hook(same, with_kwargs=True) for p in removed]


def _prove(original: nn.Module, pruned: nn.Module, removed: list[str], calib: list[Any]) -> None:
    handles = _identities(original, removed)
    try:
        diff = _worst_diff(original, pruned.eval(), calib)
    finally:
        for h in handles:
            h.remove()
    if diff > TOL:
        raise PassContractError(
            f"removing {removed} does not give the model with those blocks skipped (outputs differ "
            f"by {diff:.2e} of their scale): its forward reads the depth or a block's position from "
            "something this rewrite does not update"
        )


def prune_depth(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    n_remove: int | None = None,
    ratio: float | None = None,
    blocks: str | Sequence[str] | None = None,
) -> DepthResult:
    """Remove the blocks of lowest block influence (see the module docstring).

    Args:
        model: the model (left untouched): the user's classes, a Hugging Face
            `PreTrainedModel`, or a model `fxslim.prune` returned in the user's classes.
        calib: calibration batches (a list; each in any input form `fxslim.prune` takes).
        n_remove: how many blocks to remove; or
        ratio: the share of the lists' blocks to remove (rounded down, at least one).
        blocks: module path(s) of the block lists; default `block_lists(model)`.

    Returns:
        A `DepthResult`; its model was proven to compute the original with the removed
        blocks skipped. Save it with ``save_pretrained`` (Hugging Face) or its state dict:
        `fxslim.save` does not replay depth pruning and refuses it.

    Raises:
        ArgumentError: bad arguments, no block lists, too many blocks asked for, or a
            GraphModule (depth pruning edits the model's own lists).
        PassContractError: the rewritten model does not compute the original with those
            blocks skipped.
    """
    check_module("model", model)
    if isinstance(model, fx.GraphModule):
        raise ArgumentError(
            "prune_depth edits the model's own block lists: pass the model, or a model "
            "fxslim.prune returned in your classes (keep_classes=True), not a GraphModule"
        )
    if (n_remove is None) == (ratio is None):
        raise ArgumentError("give exactly one of n_remove (a count) and ratio (a share of the blocks)")
    if isinstance(calib, (torch.Tensor, Mapping)) or not isinstance(calib, Iterable):
        raise ArgumentError(f"calib must be a list of batches (each a model input), got a {type(calib).__name__}: "
                            "wrap one batch in a list")
    calib = list(calib)
    if not calib:
        raise ArgumentError("calib holds no batches: block influence needs at least one")
    lists = module_paths(model, blocks, "blocks") if blocks is not None else block_lists(model)
    for p in lists:
        if not isinstance(model.get_submodule(p), _LISTS):
            raise ArgumentError(f"blocks: '{p}' is a {type(model.get_submodule(p)).__name__}, "
                                "not an nn.ModuleList or nn.Sequential")
    if not lists:
        raise ArgumentError("the model has no list of two or more blocks of one class: name one with blocks=")
    total = sum(len(model.get_submodule(p)) for p in lists)
    if ratio is not None:
        n_remove = max(1, int(fraction("ratio", ratio, zero=False) * total))
    elif isinstance(n_remove, bool) or not isinstance(n_remove, int) or n_remove < 1:
        raise ArgumentError(f"n_remove must be a positive int, got {n_remove!r}")
    scores, fixed = block_influence(model, calib, lists)
    eligible = sorted((s, p) for p, s in scores.items() if p not in fixed)
    if n_remove >= total or n_remove > len(eligible):
        raise ArgumentError(
            f"n_remove={n_remove}: the lists {lists} hold {total} blocks, {len(eligible)} of "
            "them removable (same input and output shape), and at least one block must stay per list"
        )
    removed = [p for _, p in eligible[:n_remove]]
    if any(len(model.get_submodule(lst)) == sum(r.rpartition(".")[0] == lst for r in removed) for lst in lists):
        raise ArgumentError(f"n_remove={n_remove} would empty a block list; ask for fewer")
    out = copy.deepcopy(model)
    out.__dict__.pop(META_ATTR, None)  # fxslim.save's record does not describe the new depth
    depth_lists = [lst for lst in lists if len(model.get_submodule(lst)) == getattr(
        getattr(model, "config", None), "num_hidden_layers", None)]
    for lst in lists:
        gone = {int(r.rpartition(".")[2]) for r in removed if r.rpartition(".")[0] == lst}
        if not gone:
            continue
        blocks_of = out.get_submodule(lst)  # its own class (a Sequential subclass stays one)
        size = len(blocks_of)
        for i in sorted(gone, reverse=True):
            del blocks_of[i]  # ModuleList and Sequential renumber the rest
        if depth_lists == [lst]:
            _config_depth(out, lst, size, [i for i in range(size) if i not in gone])
    _prove(model, out, removed, calib)
    _check_reload(out, calib)
    logger.info("removed %d of %d blocks: %s", len(removed), total, ", ".join(removed))
    return DepthResult(out, removed, scores, lists, fixed)
