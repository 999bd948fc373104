"""Typed errors. Every error fxslim raises derives from `FxslimError`."""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "ConfigError",
    "ExportError",
    "FxslimError",
    "PassContractError",
    "PinnedChannelsError",
    "PlanMismatchError",
    "RuleError",
    "SaveLoadError",
    "SpecError",
    "TraceError",
    "UnsupportedOpError",
]


class FxslimError(Exception):
    """Root of every error fxslim raises."""


class TraceError(FxslimError):
    """The model could not be traced by torch.fx or its shapes could not be propagated."""


class UnsupportedOpError(FxslimError):
    """An op has no coupling rule and the requested operation needs one."""


class PinnedChannelsError(FxslimError):
    """The requested channels belong to a pinned (unprunable) channel group."""


class PlanMismatchError(FxslimError):
    """A pruning request or plan does not match the model it is applied to."""


class PassContractError(FxslimError):
    """Pass author: a pass broke its contract (missing requirement, failed invariant)."""


class RuleError(PassContractError):
    """An op rule failed on an op it was registered for (a bug in the rule: the message
    names the op, the module path and the node, and how to get past it)."""


class ExportError(FxslimError):
    """ONNX export, simplification or verification failed (nothing is left at the path)."""


class SaveLoadError(FxslimError):
    """A saved model is corrupt, truncated, or does not match the architecture given."""


class ArgumentError(FxslimError, ValueError, TypeError):
    """An argument has the wrong type, an out-of-range value or names nothing in the model.

    Raised before any work starts; also a ValueError/TypeError for generic handlers."""


class SpecError(ArgumentError):
    """A model, data or example-input spec (``torchvision:NAME``, ``pkg.module:function``,
    a saved directory ...) cannot be resolved; the message names the spec and what was tried."""


class ConfigError(FxslimError):
    """A pipeline config is malformed: every problem is listed with the path of the offending
    entry (``steps[1].prune.ratio``) and, for YAML, its line. Raised before any step runs."""
