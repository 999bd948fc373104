"""Channel analysis: run the rule table over a traced graph and build the coupling graph."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from fxslim.errors import FxslimError, RuleError
from fxslim.graph import rules as R
from fxslim.graph.coupling import Builder, ChannelGroup, CouplingGraph, where
from fxslim.graph.shapes import node_shapes
from fxslim.graph.trace import trace
from fxslim.utils import gc_paused

__all__ = ["analyze", "channel_groups"]

logger = logging.getLogger(__name__)


@gc_paused
def analyze(gm: fx.GraphModule) -> CouplingGraph:
    """Build the channel-coupling graph of a traced module (needs `tensor_meta` on nodes).

    Args:
        gm: a GraphModule from `fxslim.trace`.

    Returns:
        The `CouplingGraph`, whose `groups` are the channel groups.
    """
    b = Builder(gm)
    modules = dict(gm.named_modules())
    opaque = gm.meta.get("fxslim_opaque", {})  # modules kept whole by the trace (hooks)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            R.couple_placeholder(b, node)
            continue
        if node.op == "get_attr":
            R.couple_get_attr(b, node)
            continue
        if node.op == "output":
            R.couple_output(b, node)
            continue
        mod = modules.get(node.target) if node.op == "call_module" else None
        has_tensor_out = node.meta.get("tensor_meta") is not None
        rule = R.lookup_rule(node, mod)
        if not has_tensor_out and node.op != "call_module":
            key = node.target if node.op == "call_function" else f"method:{node.target}"
            if key in R.SHAPE_QUERIES or not _tensor_args(b, node):
                b.out[node] = None  # shape arithmetic, asserts: no channels involved
                continue
        if rule is None or (mod is not None and node.target in opaque):
            logger.info("no rule for %s; pinning what it touches", node.format_node())
            R.couple_unknown(b, node, mod, opaque.get(node.target) if mod is not None else None)
            continue
        try:
            rule.couple(b, node, mod, node.target if mod is not None else None)
            if rule.fix_literals is not None:
                for s in R.literal_spaces(b, node, rule):
                    b.note(s, "literal", node.name, -1)
        except FxslimError:
            raise
        except Exception as exc:
            raise RuleError(
                f"the rule for {where(node, gm)} failed ({type(exc).__name__}: {exc}).\n"
                f"  node: {node.format_node()}\n  Way out: mark its module as a leaf (trace(..., "
                f"leaf_paths=[...])) or replace the rule with register_rule; please report it."
            ) from exc
        if b.out.get(node) is None and isinstance(node_shapes(node), tuple):
            # a tensor read out of something fxslim cannot see into (a leaf's ModelOutput)
            b.out[node] = b.fresh(node_shapes(node), node.name,
                                  f"{where(node, gm)} reads a tensor out of an output fxslim cannot follow")
    b.flush_pending()
    _note_attrs(b, modules)
    return b.finish()


def _note_attrs(b: Builder, modules: dict[str, nn.Module]) -> None:
    """Report the module attributes a prune rewrites as group members: those of every
    module that owns a member, whichever form (module or function) used its parameters."""
    for path in sorted(b.touched_modules):
        mod = modules.get(path)
        rule = R.rule_of_type(type(mod)) if mod is not None else None
        if rule is None or rule.sync is None:
            continue
        attrs = rule.attrs(mod) if callable(rule.attrs) else rule.attrs
        prefix = f"{path}." if path else ""
        for attr, param, dim in attrs:
            s = b.member_space.get((prefix + param, dim))
            if s is not None:
                b.note(s, "attr", prefix + attr, dim)


def _tensor_args(b: Builder, node: fx.Node) -> list:
    out = []
    fx.node.map_aggregate(
        (node.args, node.kwargs),
        lambda a: out.append(a) if isinstance(a, fx.Node) and b.out.get(a) is not None else None,
    )
    return out


def channel_groups(
    model: nn.Module | fx.GraphModule,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type] = (),
    leaf_paths: Iterable[str] = (),
    capture: str = "auto",
) -> list[ChannelGroup]:
    """The channel groups of a model: what can be pruned together, and what is pinned and why.

    Args:
        model: an nn.Module (traced here) or a GraphModule from `fxslim.trace`.
        example_inputs: a tensor, a tuple of tensors, or a dict / ``BatchEncoding`` of
            keyword inputs, for the forward pass.
        leaf_modules, leaf_paths, capture: as in `fxslim.trace`.

    Returns:
        A list of `ChannelGroup` in graph order.

    Example:
        >>> groups = fxslim.channel_groups(resnet18(), torch.randn(1, 3, 64, 64))
        >>> [g.size for g in groups if g.prunable][:3]
        [64, 64, 64]
    """
    gm = model if _has_meta(model) else trace(model, example_inputs, leaf_modules=leaf_modules,
                                              leaf_paths=leaf_paths, capture=capture)
    return analyze(gm).groups


def _has_meta(model: Any) -> bool:
    return isinstance(model, fx.GraphModule) and all(
        "tensor_meta" in n.meta for n in model.graph.nodes if n.op == "placeholder"
    )
