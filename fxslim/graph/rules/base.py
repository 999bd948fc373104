"""The rule type, the table and its lookups."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["RULES", "SHAPE_QUERIES", "Rule", "lookup_rule", "register_rule", "rule_of_type", "sync_of"]


@dataclass(frozen=True)
class Rule:
    """One table entry.

    Attributes:
        couple: fills the builder for one node: ``couple(b, node, mod, path)``.
        sync: after slicing, brings a module's attributes in line with its new
            parameter shapes: ``sync(mod)``. None for functions and parameter-free ops.
        fix_literals: after slicing, rewrites literal sizes in the node's arguments:
            ``fix_literals(node, new_sizes, kept, dynamic)``.
        attrs: module attributes that `sync` changes, each as (attribute, parameter,
            dim): the attribute follows that parameter dim (reported as group members);
            or a function of the module returning them.
    """

    couple: Callable
    sync: Callable | None = None
    fix_literals: Callable | None = None
    attrs: Any = ()


RULES: dict[Any, Rule] = {}

# Ops that read shapes or assert: they carry no channels and need no rule.
SHAPE_QUERIES = {
    "method:size", "method:dim", "method:numel", getattr, torch._assert,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv,
    operator.mod, operator.neg, math.sqrt, len, torch.sym_int, torch.sym_float, int, float,
}


def register_rule(key: Any, couple: Callable, sync: Callable | None = None,
                  fix_literals: Callable | None = None, attrs: tuple = ()) -> None:
    """Register (or replace) the coupling rule for a module type, function or method.

    Args:
        key: an nn.Module subclass, a function (e.g. ``torch.relu``), a
            ``torch.autograd.Function`` subclass (its ``apply`` calls) or ``"method:<name>"``.
        couple: ``couple(b, node, mod, path)``; see the helpers in this module
            (`elementwise`, `same_as_input`) for the common cases.
        sync: optional ``sync(mod)`` to update module attributes after slicing.
        fix_literals: optional ``fix_literals(node, new_sizes, kept, dynamic)``.
        attrs: optional (attribute, parameter, dim) triples that `sync` changes.

    Example:
        >>> register_rule(MySwish, elementwise)  # output channels == input channels
    """
    RULES[key] = Rule(couple, sync, fix_literals, attrs if callable(attrs) else tuple(attrs))



def lookup_rule(node: fx.Node, mod: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        t = type(mod)
        if t in RULES:
            return RULES[t]
        for base in t.__mro__[1:]:
            # a subclass inherits its parent's rule only if it keeps the parent's forward
            if base in RULES and t.forward is base.forward:
                return RULES[base]
        return None
    if node.op == "call_function":  # a custom autograd Function is keyed by its class
        return RULES.get(getattr(node.target, "autograd_function", node.target))
    if node.op == "call_method":
        return RULES.get(f"method:{node.target}")
    return None


def rule_of_type(t: type) -> Rule | None:
    """The first rule with an attribute sync along a module type's MRO: a subclass that
    fx traces into (its parameters reach function forms) still owns its parent's
    size attributes (``out_channels``, ``num_features`` ...)."""
    for base in t.__mro__:
        rule = RULES.get(base)
        if rule is not None and rule.sync is not None:
            return rule
    return None


def sync_of(mod: nn.Module) -> Callable | None:
    """The attribute-sync function for a module's type (inherited along the MRO)."""
    rule = rule_of_type(type(mod))
    return rule.sync if rule is not None else None
