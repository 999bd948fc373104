"""The operands of a layer op, read the same way from its module form and its function form.

A layer rule (convolution, linear, the norms, embedding, PReLU, pooling) is written
once, against `LayerOperands`: the input node, the tensor parameters (qualified names in
the traced module, shapes) and the settings that encode sizes or change the channel
algebra (``groups``, ``num_groups``, ``normalized_shape``, ``return_indices`` ...).

* Module form (``call_module``, e.g. ``nn.BatchNorm2d`` at 'bn1'): parameters are the
  module's attributes ('bn1.weight'), settings its attributes (``mod.groups``).
* Function form (``call_function``, e.g. ``F.batch_norm(x, bn1.running_mean, ...)``,
  met when fx traces into a module subclass or a fused layer such as timm's
  ``BatchNormAct2d``): settings are the call's arguments; every tensor parameter must be
  a ``get_attr`` node, i.e. a parameter or buffer of the module that owns it. A computed
  operand (a standardised weight, a weight built from other tensors) is not guessed at:
  the op is pinned and the reason names the operand, the op and the module path. The one
  exception is a 1-d ``bias`` computed in the graph (BEiT's ``cat((q_bias, zeros, v_bias))``
  for its fused qkv): it is added channel by channel, so its dim joins the output
  channels and the rules of the ops that built it slice its sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxslim.graph.coupling import Builder, where
from fxslim.graph.rules.common import _fetch_attr, _is_tensor, _shape, couple_unknown

__all__ = ["FUNCTION_ARGS", "LayerOperands", "Param", "layer_operands"]

# positional order and defaults of the function forms (torch's own signatures)
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_POOL = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
FUNCTION_ARGS: dict[Any, tuple[str, ...]] = {
    **dict.fromkeys((F.conv1d, F.conv2d, F.conv3d), _CONV),
    **dict.fromkeys((F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d), _CONV_T),
    F.linear: ("input", "weight", "bias"),
    torch.addmm: ("bias", "input", "weight", "beta", "alpha"),  # torch's names: input, mat1, mat2
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    F.instance_norm: ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats",
                      "momentum", "eps"),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    F.prelu: ("input", "weight"),
    **dict.fromkeys((F.max_pool1d, F.max_pool2d, F.max_pool3d), _POOL),
    **dict.fromkeys((F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d),
                    ("input", "output_size", "return_indices")),
    **dict.fromkeys((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
                    ("input", "output_size")),
    **dict.fromkeys((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d), ("input", "kernel_size", "stride", "padding")),
    **dict.fromkeys((F.lp_pool1d, F.lp_pool2d, F.lp_pool3d), ("input", "norm_type", "kernel_size", "stride")),
}
_DEFAULTS = {"groups": 1, "return_indices": False, "max_norm": None, "stride": 1, "padding": 0}


@dataclass(frozen=True)
class Param:
    """A tensor operand of a layer: a parameter or buffer of the traced module."""

    target: str  # qualified name, e.g. "layer1.0.bn1.weight"
    kind: str  # "param" or "buffer"
    shape: tuple[int, ...]


@dataclass
class LayerOperands:
    """One layer call, whichever form it takes.

    Attributes:
        x: the input node.
        params: the tensor operands that are present, by their torch name.
        settings: the requested settings, by their torch name.
        function: True for the function form.
        label: a label for new spaces (the module path, or the node name).
    """

    x: fx.Node
    params: dict[str, Param]
    settings: dict[str, Any]
    function: bool
    label: str
    computed: dict[str, fx.Node] = field(default_factory=dict)

    def member(self, b: Builder, space: int, name: str, dim: int, role: str) -> None:
        """`space` slices operand `name` along `dim` (nothing when the operand is absent);
        a computed operand's dim joins `space`."""
        p = self.params.get(name)
        if p is not None:
            b.member(space, p.kind, p.target, dim, role)
        elif name in self.computed:
            b.union(space, b.out[self.computed[name]][dim])

    def not_channels(self, b: Builder, name: str, dims: Any, reason: str) -> None:
        """Dims of operand `name` that carry no channels (kernel dims): never sliced."""
        p = self.params.get(name)
        if p is not None:
            for d in dims:
                b.not_channels(p.target, d, reason)


def layer_operands(
    b: Builder, node: fx.Node, mod: nn.Module | None, path: str | None,
    tensors: tuple[str, ...] = (), settings: tuple[str, ...] = (),
) -> LayerOperands | None:
    """The operands of a layer call, or None after pinning the op when one is computed.

    Args:
        tensors: names of the tensor operands the rule slices ("weight", "bias", ...).
        settings: names of the settings the rule reads ("groups", "num_groups", ...).
    """
    if mod is not None:
        params = {}
        for name in tensors:
            t = getattr(mod, name, None)
            if t is not None:
                kind = "param" if isinstance(t, nn.Parameter) else "buffer"
                params[name] = Param(f"{path}.{name}" if path else name, kind, tuple(t.shape))
        vals = {name: getattr(mod, name, _DEFAULTS.get(name)) for name in settings}
        return LayerOperands(node.args[0] if node.args else node.kwargs["input"], params, vals, False, path or node.name)
    names = FUNCTION_ARGS.get(node.target, ("input",))
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    params, computed = {}, {}
    for name in tensors:
        a = bound.get(name)
        if a is None:
            continue
        if name == "bias" and isinstance(a, fx.Node) and a.op != "get_attr" and _is_tensor(b, a) \
                and isinstance(_shape(a), tuple) and len(_shape(a)) == 1:
            computed[name] = a
            continue
        if not isinstance(a, fx.Node) or a.op != "get_attr":
            what = a.format_node() if isinstance(a, fx.Node) else repr(a)
            couple_unknown(b, node, None, f"the {name} of {where(node, b.gm)} is computed ({what}), "
                                          f"not a parameter of a module")
            return None
        t = _fetch_attr(b.gm, a.target)
        kind = "param" if isinstance(t, nn.Parameter) else "buffer"
        params[name] = Param(a.target, kind, tuple(t.shape))
    vals = {name: bound.get(name, _DEFAULTS.get(name)) for name in settings}
    for name, v in vals.items():
        if _has_node(v):
            couple_unknown(b, node, None, f"the {name} of {where(node, b.gm)} is computed in the graph")
            return None
    return LayerOperands(bound["input"], params, vals, True, node.name, computed)


def _has_node(v: Any) -> bool:
    found = []
    fx.node.map_aggregate(v, lambda a: found.append(a) if isinstance(a, fx.Node) else None)
    return bool(found)
