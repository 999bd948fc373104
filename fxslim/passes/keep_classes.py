"""Class-keeping rewrite: the pruned model as the user's own classes.

`apply_plan` regenerates a torch.fx GraphModule: a pruned resnet18 is no longer a
``ResNet``, ``small.layer1[0]`` fails and the model's own methods are gone. This pass
takes the user's model and the pruned GraphModule (which the oracles prove) and builds
the same pruned model out of the user's classes:

1. copy the user's module tree (same classes and Python attributes, train/eval flags
   and hooks; the user's model is untouched);
2. give every parameter and buffer the pruned GraphModule's tensor of the same
   qualified name (the trace keeps the user's names), so it is sliced exactly as the
   oracles proved. One tensor held under several names (tied weights) stays one tensor;
   `requires_grad`, dtype and device are the pruned tensor's;
3. bring each changed module's size attributes in line with its new parameter shapes
   with the rule table's ``sync`` (``out_channels``, ``in_features``, ``num_features``,
   ``normalized_shape``, ``nn.MultiheadAttention``'s ``embed_dim``/``num_heads`` ...),
   and, for classes fx traces through, `CLASS_SYNCS` (torchvision ViT's ``hidden_dim``,
   Swin's and MaxViT's head counts). A Hugging Face `PreTrainedModel` is instead rebuilt
   from the config that builds the pruned shapes (`fxslim.passes.hf_classes`);
4. prove it: a torch.fx capture traced again from the class-kept copy gives the pruned
   graph node for node, with the same tensors and leaf modules (`_same_graph`); else
   run the class-kept copy and the pruned GraphModule on the example inputs and on a
   second seeded input of the same shape; every output must agree (``allclose``, rtol
   ``KEEP_RTOL``, atol ``KEEP_ATOL`` times the output's scale).

Where the proof fails the GraphModule is returned and the reason logged and kept in
``gm.meta["fxslim_form_reason"]``: a size written in the user's forward (``x.view(n,
64 * 7 * 7)``, which the graph rewrite changed as a literal; ShuffleNet's ``chunk(2)`` of
unevenly pruned halves), a module attribute no sync knows, parameters the traced forward
never reads (GoogLeNet's auxiliary heads in eval: their sizes cannot be checked), tied
tensors the plan slices differently, per-layer sizes an HF config cannot express.

The record fxslim needs on a pruned model (source fingerprint, example input specs,
prune history, kept indices: what `save`, `load`, `distill` and the pipeline read) is a
GraphModule's ``gm.meta``; on a class-kept model it is one dict attribute,
``model.fxslim_meta`` (same keys), read by `fxslim.utils.fxslim_meta` for both forms.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from fxslim._inputs import ExampleInputs, as_inputs
from fxslim.graph import rules as R
from fxslim.graph.trace import _user_frame, copy_structure
from fxslim.passes._same_graph import graph_mismatch
from fxslim.passes.base import Pass, PassResult
from fxslim.passes.verify import _flat
from fxslim.utils import META_ATTR, fxslim_meta

__all__ = ["CLASS_SYNCS", "KEEP_ATOL", "KEEP_RTOL", "KeepClassesPass", "keep_classes", "rebuild_classes"]

logger = logging.getLogger(__name__)

KEEP_RTOL, KEEP_ATOL = 1e-4, 1e-5  # atol is scaled by each output's max |value|
_NOT_CARRIED = ("fxslim_opaque", "fxslim_form_reason")  # trace-time facts of the GraphModule itself


def _timm_rope_heads(m: nn.Module) -> None:
    """timm's AttentionRope: head counts from the pruned projections (head_dim stays: heads go whole)."""
    if m.qkv is not None:
        heads = kv = m.qkv.weight.shape[0] // (3 * m.head_dim)
    else:
        heads, kv = m.q_proj.weight.shape[0] // m.head_dim, m.k_proj.weight.shape[0] // m.head_dim
    m.num_heads, m.num_kv_heads, m.num_kv_groups = heads, kv, heads // kv
    m.attn_dim, m.kv_dim = heads * m.head_dim, kv * m.head_dim


# Size attributes of classes fx traces *through* (so no rule's ``sync`` sees them), per
# "module.QualName": ``fn(mod)`` sets them from the module's own (sliced) tensors. Users may add theirs.
CLASS_SYNCS: dict[str, Callable[[nn.Module], None]] = {
    # reshape(n, self.hidden_dim, h * w) in _process_input: hidden_dim follows the class token
    "torchvision.models.vision_transformer.VisionTransformer":
        lambda m: setattr(m, "hidden_dim", m.class_token.shape[-1]),
    # shifted_window_attention(..., self.num_heads): one bias-table column per head
    "torchvision.models.swin_transformer.ShiftedWindowAttention":
        lambda m: setattr(m, "num_heads", m.relative_position_bias_table.shape[1]),
    # v2: one logit scale per head
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2":
        lambda m: setattr(m, "num_heads", m.logit_scale.shape[0]),
    # timm's Attention (ViT, DeiT, hybrids): qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim);
    # heads go whole, so head_dim stays and the qkv rows give the head count
    "timm.layers.attention.Attention": lambda m: (
        setattr(m, "num_heads", m.qkv.weight.shape[0] // (3 * m.head_dim)),
        setattr(m, "attn_dim", m.num_heads * m.head_dim)),
    # qkv.reshape(B, N, 3, self.num_heads, self.head_dim), or q/k/v projections with num_kv_heads (GQA)
    "timm.layers.attention.AttentionRope": _timm_rope_heads,
    # timm's BEiT: qkv.reshape(B, N, 3, self.num_heads, -1); head_dim only in the scale (D ** -0.5)
    "timm.models.beit.Attention": lambda m: setattr(
        m, "num_heads", m.qkv.weight.shape[0] // (3 * round(m.scale ** -2))),
    # timm's Swin: qkv(x).reshape(B_, N, 3, self.num_heads, -1); one bias-table column per head
    "timm.models.swin_transformer.WindowAttention":
        lambda m: setattr(m, "num_heads", m.relative_position_bias_table.shape[1]),
    # EVA / EVA02: qkv.reshape(B, N, 3, self.num_heads, -1), fused qkv or q/k/v projections (its
    # output reshape(B, N, C) also needs the heads' width to equal the block's: the proof decides)
    "timm.models.eva.EvaAttention": lambda m: setattr(m, "num_heads", (
        m.qkv.weight.shape[0] // 3 if m.qkv is not None else m.q_proj.weight.shape[0]) // m.head_dim),
    # CaiT: qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads), talking heads mix heads in
    # proj_l / proj_w (num_heads x num_heads); class attention: q(x).reshape(B, 1, self.num_heads, ...)
    "timm.models.cait.TalkingHeadAttn": lambda m: setattr(m, "num_heads", m.proj_l.weight.shape[0]),
    "timm.models.cait.ClassAttn": lambda m: setattr(
        m, "num_heads", m.q.weight.shape[0] // round(m.scale ** -2)),
    # ConViT: one gating parameter per head (GPSA); qkv rows per head dim (MHSA); head_dim only in scale
    "timm.models.convit.GPSA": lambda m: setattr(m, "num_heads", m.gating_param.shape[0]),
    "timm.models.convit.MHSA": lambda m: setattr(
        m, "num_heads", m.qkv.weight.shape[0] // (3 * round(m.scale ** -2))),
    # q.reshape(B, G, P, self.n_heads, self.head_dim): a bias-table column per head, q/k/v rows per head dim
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": lambda m: (
        setattr(m, "n_heads", m.relative_position_bias_table.shape[-1]),
        setattr(m, "head_dim", m.to_qkv.weight.shape[0] // (3 * m.n_heads))),
}


def _class_sync(mod: nn.Module) -> Callable[[nn.Module], None] | None:
    for cls in type(mod).__mro__:
        fn = CLASS_SYNCS.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            return fn
    return None


class _Refused(Exception):
    """Internal: why the class-keeping rewrite cannot be used (caught in this module)."""


def rebuild_classes(model: nn.Module, pruned: fx.GraphModule) -> nn.Module:
    """Steps 1-3 of the module doc, unproven: the user's classes with `pruned`'s tensors.

    The result shares tensors with `pruned`. Raises `_Refused` with the reason.
    """
    new = copy_structure(model)
    got: dict[str, torch.Tensor] = {}
    for table in (pruned.named_parameters(remove_duplicate=False), pruned.named_buffers(remove_duplicate=False)):
        got.update(table)
    holders: dict[int, list[tuple[str, nn.Module, str, torch.Tensor]]] = defaultdict(list)
    for path, mod in new.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None:
                    holders[id(t)].append((prefix + name, mod, name, t))
    unused, changed = [], set()
    for entries in holders.values():
        names = [e[0] for e in entries]
        found = [(n, got[n]) for n in names if n in got]
        if not found and isinstance(entries[0][3], nn.Parameter):
            unused.append(names[0])
            continue
        if not found:  # a buffer the graph does not read (folded into a constant, or unused): the
            found = [(names[0], entries[0][3].clone())]  # class's forward runs on it in the proof
        first_name, t = found[0]
        for other_name, o in found[1:]:
            if o is not t and (o.shape != t.shape or not torch.equal(o, t)):
                raise _Refused(f"'{first_name}' and '{other_name}' are one tensor in the model, but the pruned "
                               f"graph holds them as {tuple(t.shape)} and {tuple(o.shape)}: the tie cannot be kept")
        orig = entries[0][3]
        if isinstance(orig, nn.Parameter):
            t = t if isinstance(t, nn.Parameter) and t.requires_grad == orig.requires_grad \
                else nn.Parameter(t.detach(), requires_grad=orig.requires_grad)
        elif isinstance(t, nn.Parameter):
            t = t.detach()
        for fqn, mod, name, old in entries:
            (mod._parameters if name in mod._parameters else mod._buffers)[name] = t
            if old.shape != t.shape:
                changed.add(id(mod))
    if unused:
        raise _Refused(f"{len(unused)} parameters are not used by the traced forward (e.g. '{unused[0]}': a branch "
                       "of another mode, such as an auxiliary head in training); their sizes cannot be checked")
    for path, mod in new.named_modules():
        # a class sync reads tensors its children may hold (timm's Attention: qkv.weight), so it always runs
        if id(mod) not in changed and _class_sync(mod) is None:
            continue
        syncs = [f for f in (R.sync_of(mod), _class_sync(mod)) if f is not None]
        try:
            for sync in syncs:
                sync(mod)
        except Exception as exc:  # a rule's sync on a subclass it does not fit
            raise _Refused(f"updating the size attributes of {type(mod).__name__} at '{path}' failed "
                           f"({type(exc).__name__}: {exc})") from exc
    record = {k: v for k, v in fxslim_meta(pruned).items() if k.startswith("fxslim_") and k not in _NOT_CARRIED}
    setattr(new, META_ATTR, record)
    return new


def _second_input(inputs: ExampleInputs, seed: int = 0) -> ExampleInputs:
    """Seeded inputs of the example's shapes: normal floats; integer and boolean inputs
    (token ids, masks) are the example's own values shuffled, so they stay in range."""
    g = torch.Generator().manual_seed(seed)

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.is_floating_point():
            return torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        perm = torch.randperm(x.numel(), generator=g).to(x.device)
        return x.reshape(-1)[perm].reshape(x.shape)

    return ExampleInputs(tuple(one(a) for a in inputs.args), {k: one(v) for k, v in inputs.kwargs.items()})


def _failing_module(exc: BaseException, model: nn.Module) -> str:
    """The innermost module of `model` whose forward was running when `exc` was raised."""
    paths = {id(m): p for p, m in model.named_modules()}
    where = None
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in paths:
            where = paths[id(owner)]
        tb = tb.tb_next
    if where is None:
        return ""
    return f" in '{where or '<top level>'}' ({type(model.get_submodule(where)).__name__})"


def _prove(kept: nn.Module, pruned: fx.GraphModule, example_inputs: Any) -> None:
    """Raise `_Refused` unless `kept` and `pruned` agree on the example and a seeded input."""
    xs = as_inputs(example_inputs)
    modes = [(m, m.training) for m in (*kept.modules(), *pruned.modules())]
    # a forward may update buffers in place (counters, running statistics): these runs leave no trace
    buffers = {id(b): (b, b.clone()) for b in (*kept.buffers(), *pruned.buffers())}
    try:
        kept.eval()
        pruned.eval()
        with torch.no_grad():
            for inputs in (xs, _second_input(xs)):
                want = _flat(pruned(*inputs.flat(pruned)))
                try:
                    got = _flat(inputs.call(kept))
                except Exception as exc:
                    raise _Refused(
                        f"{type(kept).__name__}'s own forward fails on the pruned sizes{_failing_module(exc, kept)}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
                        f"  at {_user_frame(exc)}\n"
                        "  (a size written in the forward, or a module attribute fxslim does not update)") from exc
                if len(got) != len(want):
                    raise _Refused(f"its forward returns {len(got)} tensors, the pruned graph {len(want)}")
                for i, (a, b) in enumerate(zip(got, want)):
                    scale = float(b.abs().max()) if b.numel() else 0.0
                    if a.shape != b.shape or not torch.allclose(a, b, rtol=KEEP_RTOL, atol=KEEP_ATOL * max(scale, 1.0)):
                        diff = float((a - b).abs().max()) if a.shape == b.shape else float("inf")
                        raise _Refused(f"output {i} differs from the pruned graph's ({tuple(a.shape)} vs "
                                       f"{tuple(b.shape)}, max |diff| {diff:.3e}): its forward reads a size "
                                       "the graph rewrite changed")
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers.values():
                b.copy_(saved)


def keep_classes(model: nn.Module, pruned: fx.GraphModule, example_inputs: Any,
                 trace_options: Mapping[str, Any] | None = None) -> nn.Module:
    """The pruned model as the user's own classes where proven, else `pruned` itself.

    Args:
        model: the model that was traced and pruned (left untouched).
        pruned: the pruned GraphModule (`apply_plan`'s result); its tensors are reused.
        example_inputs: the inputs the model was traced with.
        trace_options: the `fxslim.trace` options `pruned` was traced with, if known: with
            them a torch.fx capture is proven by tracing the copy again and comparing
            graphs (`fxslim.passes._same_graph`), cheaper than running it; otherwise, or
            where the graphs differ, by running both.

    Returns:
        A copy of `model`'s classes with the pruned tensors and sizes (its record in
        ``model.fxslim_meta``), or `pruned` with ``meta["fxslim_form_reason"]`` saying
        why not (also logged).

    Example:
        >>> gm = fxslim.apply_plan(fxslim.trace(model, x), cg, plan, x)
        >>> small = keep_classes(model, gm, x)
        >>> small.layer1[0].conv1.out_channels
    """
    if isinstance(model, fx.GraphModule) or not isinstance(pruned, fx.GraphModule):
        return pruned  # its class is GraphModule already / a run capture's prune is the user's classes
    try:
        kept = rebuild_classes(model, pruned)
        if _is_pretrained(model):
            kept = _rebuild_from_config(model, kept, pruned, example_inputs)
        else:
            why = graph_mismatch(kept, pruned, trace_options)
            if why is not None:
                logger.debug("class-kept %s proven by running it (%s)", type(model).__name__, why)
                _prove(kept, pruned, example_inputs)
    except _Refused as exc:
        reason = str(exc)
        pruned.meta["fxslim_form_reason"] = reason
        logger.warning("the pruned %s is returned as a torch.fx GraphModule, not as its own classes: %s",
                       type(model).__name__, reason)
        return pruned
    return kept


def _is_pretrained(model: nn.Module) -> bool:
    from fxslim.graph.capture import is_transformers_model

    return is_transformers_model(model)


def _rebuild_from_config(model: nn.Module, generic: nn.Module, pruned: fx.GraphModule, example_inputs: Any) -> nn.Module:
    """A transformers model rebuilt from the config that builds the pruned shapes, proven
    (`fxslim.passes.hf_classes`); `generic` holds the pruned tensors under the model's names."""
    from fxslim.passes.hf_classes import ConfigMismatch, config_candidates, rebuild_pretrained

    target = {k: tuple(v.shape) for k, v in generic.state_dict().items()}
    last: _Refused | None = None
    try:
        for cfg in config_candidates(model, target):
            kept = rebuild_pretrained(model, generic, cfg)
            setattr(kept, META_ATTR, fxslim_meta(generic))
            try:
                _prove(kept, pruned, example_inputs)
                return kept
            except _Refused as exc:
                last = exc
    except ConfigMismatch as exc:
        raise _Refused(f"its config cannot be rebuilt for the pruned sizes: {exc}") from exc
    raise _Refused(f"no config of the pruned sizes gives the pruned graph's outputs: {last}")


class KeepClassesPass(Pass):
    """The class-keeping rewrite as a pass: `call(pruned)` returns the class-kept model
    (``modified=True``) or the GraphModule itself (``modified=False``, ``info["reason"]``).

    Args:
        model: the user's model that `pruned` was traced from.
        example_inputs: the inputs it was traced with.
    """

    def __init__(self, model: nn.Module, example_inputs: Any):
        self.model, self.example_inputs = model, example_inputs

    def call(self, gm: fx.GraphModule) -> PassResult:
        out = keep_classes(self.model, gm, self.example_inputs)
        return PassResult(out, out is not gm, {"reason": fxslim_meta(gm).get("fxslim_form_reason")})

    def ensures(self, result: PassResult) -> None:
        if isinstance(result.module, fx.GraphModule):
            result.module.graph.lint()
