"""Checks of what users pass to the public entry points, made before any work starts.

Every check raises `ArgumentError` (an `FxslimError`, and also a ValueError/TypeError so
that generic handlers keep working) saying what was wrong and what is accepted.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

from torch import nn

from fxslim.errors import ArgumentError

__all__ = ["check_module", "choice", "closest", "fraction", "known_names", "module_paths", "number", "positive_int", "ratio_map"]


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"


def check_module(name: str, value: Any) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise ArgumentError(f"{name} must be a torch.nn.Module, got {_shown(value)}")
    return value


def number(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
           hi_open: bool = False, none: bool = False) -> float | None:
    """`value` as a float inside the interval, or ArgumentError."""
    if value is None and none:
        return None
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    span = f"{left}{lo:g}, {hi:g}{right}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ArgumentError(f"{name} must be a number in {span}{' or None' if none else ''}, got {_shown(value)}")
    v = float(value)
    if math.isnan(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise ArgumentError(f"{name} must be in {span}, got {value!r}")
    return v


def fraction(name: str, value: Any, *, zero: bool = True, none: bool = False) -> float | None:
    """A share in [0, 1) (or (0, 1) with ``zero=False``)."""
    return number(name, value, 0.0, 1.0, lo_open=not zero, hi_open=True, none=none)


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(f"{name} must be a positive int, got {_shown(value)}")
    return value


def closest(name: str, known: Iterable[str]) -> str:
    """' (closest: a, b)' for an unknown name, or ''."""
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" (closest: {', '.join(near)})" if near else ""


def module_paths(model: nn.Module, names: Any, what: str) -> list[str]:
    """Module paths of `model` named by `names`: one path (a str), or an iterable of paths
    and module objects. An unknown path is an error naming the closest real ones."""
    if names is None:
        return []
    if isinstance(names, (str, nn.Module)):
        names = [names]
    if not isinstance(names, Iterable):
        raise ArgumentError(f"{what} must be a module path, a module, or a list of them, got {_shown(names)}")
    by_id = {id(m): n for n, m in model.named_modules()}
    known = set(by_id.values()) - {""}
    out = []
    for item in names:
        if isinstance(item, nn.Module):
            if id(item) not in by_id or by_id[id(item)] == "":
                raise ArgumentError(f"{what}: {type(item).__name__} object is not a submodule of the model")
            out.append(by_id[id(item)])
        elif isinstance(item, str):
            if item not in known:
                raise ArgumentError(f"{what}: the model has no module '{item}'{closest(item, known)}")
            out.append(item)
        else:
            raise ArgumentError(f"{what} entries must be module paths (str) or modules, got {_shown(item)}")
    return out


def ratio_map(model: nn.Module, mapping: Any, what: str) -> dict[str, float]:
    """{module path: ratio in [0, 1)} with every path checked against the model."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ArgumentError(f"{what} must be a mapping {{module path: ratio}}, got {_shown(mapping)}")
    paths = module_paths(model, list(mapping), what)
    return {p: fraction(f"{what}['{p}']", v) for p, v in zip(paths, mapping.values())}


def known_names(what: str, given: Mapping[str, Any], known: Iterable[str]) -> None:
    """Every key of `given` is one of `known`, or an error naming the closest."""
    known = list(known)
    for key in given:
        if key not in known:
            raise ArgumentError(f"unknown {what} '{key}'{closest(str(key), known)}; accepted: {', '.join(known)}")


def choice(name: str, value: Any, options: Iterable[str], *, callable_ok: bool = False) -> Any:
    opts = list(options)
    if callable_ok and callable(value):
        return value
    if not isinstance(value, str) or value not in opts:
        also = " or a callable" if callable_ok else ""
        raise ArgumentError(f"{name} must be one of {opts}{also}, got {_shown(value)}"
                            + (closest(value, opts) if isinstance(value, str) else ""))
    return value

