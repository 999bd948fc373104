"""Example inputs in one form: positional arguments plus keyword arguments.

Users hand a model's inputs over the way they call it: a tensor, a tuple of tensors, or
(Hugging Face) a dict / ``BatchEncoding`` of ``input_ids``, ``attention_mask``,
``pixel_values`` ... `as_inputs` turns any of them into an `ExampleInputs` once, at the
public entry point; everything below carries that object (``as_inputs`` of an
`ExampleInputs` is the object itself), so no layer normalises again.

A mapping is taken as keyword arguments (``model(**batch)``), a tuple or list as
positional ones, anything else as the one positional argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxslim.errors import TraceError

__all__ = ["ExampleInputs", "as_inputs"]


@dataclass(frozen=True)
class ExampleInputs:
    """A model's example inputs: ``model(*args, **kwargs)``.

    Attributes:
        args: the positional arguments.
        kwargs: the keyword arguments (names of the forward's parameters).
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, module: Any) -> Any:
        """``module(*args, **kwargs)``."""
        return module(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor among the inputs, positional first."""
        leaves = list(self.args) + list(self.kwargs.values())
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    def flat(self, gm: fx.GraphModule) -> tuple:
        """The values of `gm`'s placeholders, in their order.

        A GraphModule with pytree input handling (a `torch.export` capture) flattens
        ``(args, kwargs)`` by its input spec; a symbolically traced one binds the args to
        its placeholders in order and the kwargs by name (a missing one takes the
        placeholder's default).
        """
        info = getattr(gm.graph._codegen, "pytree_info", None)
        if info is not None and info.in_spec is not None:
            from torch.fx._pytree import tree_flatten_spec

            try:
                return tuple(tree_flatten_spec((self.args, self.kwargs), info.in_spec))
            except Exception as exc:
                raise TraceError(f"the inputs {self.describe()} do not match the captured model's "
                                 f"inputs {info.orig_args}: {exc}") from exc
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        if len(self.args) > len(names) or set(self.kwargs) - set(names[len(self.args):]):
            raise TraceError(f"the inputs {self.describe()} do not match the model's inputs {names}")
        out = list(self.args)
        defaults = {n.target: (n.args[0] if n.args else None) for n in gm.graph.nodes if n.op == "placeholder"}
        out += [self.kwargs[name] if name in self.kwargs else defaults[name] for name in names[len(self.args):]]
        return tuple(out)

    def describe(self) -> str:
        """A short description: shapes of positional and keyword tensors."""
        def one(v: Any) -> str:
            if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
                return f"[{', '.join(one(t) for t in v)}]"  # a list of images (detectors)
            return f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)[:30]
        parts = [one(a) for a in self.args] + [f"{k}={one(v)}" for k, v in self.kwargs.items()]
        return f"({', '.join(parts)})"


def as_inputs(example_inputs: Any) -> ExampleInputs:
    """`example_inputs` as an `ExampleInputs` (see the module docstring for the forms).

    Raises:
        TraceError: keyword names that are not strings.

    Example:
        >>> as_inputs(tokenizer("hello", return_tensors="pt")).kwargs.keys()
        dict_keys(['input_ids', 'attention_mask'])
    """
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs
    if isinstance(example_inputs, Mapping):  # a dict or a transformers BatchEncoding
        kwargs = dict(example_inputs.items())
        bad = [k for k in kwargs if not isinstance(k, str)]
        if bad:
            raise TraceError(f"input names must be strings (the forward's parameter names), got {bad!r}")
        return ExampleInputs((), kwargs)
    if isinstance(example_inputs, (tuple, list)):
        return ExampleInputs(tuple(example_inputs), {})
    return ExampleInputs((example_inputs,), {})
