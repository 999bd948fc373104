"""Pass infrastructure: a pass takes a GraphModule and returns a `PassResult`.

`Pass.__call__` runs ``requires -> call -> ensures``. Passes that rewrite say so with
`functional = True` (they return a new module, the input is untouched); checkers return
``modified=False``. A `PassManager` is a flat list of passes and is itself a pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from fxslim.errors import PassContractError

__all__ = ["Pass", "PassManager", "PassResult"]


@dataclass
class PassResult:
    """What a pass returns.

    Attributes:
        module: the resulting module (a new one for functional passes).
        modified: computed by the pass (e.g. parameter counts before/after), never assumed.
        info: pass-specific facts (counts, reports, plans).
    """

    module: fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class: subclasses implement `call`, and may override `requires`/`ensures`."""

    functional: bool = True

    def requires(self, gm: fx.GraphModule) -> None:
        """Check preconditions; the default needs shape metadata from `fxslim.trace`."""
        missing = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "tensor_meta" not in n.meta]
        if missing:
            raise PassContractError(
                f"pass author: {type(self).__name__} needs shape metadata on {missing}; "
                "run fxslim.trace (shape propagation) first"
            )

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def ensures(self, result: PassResult) -> None:
        """Check postconditions; the default lints the graph (a run capture's rewrite is the
        user's own classes: no graph)."""
        if isinstance(result.module, fx.GraphModule):
            result.module.graph.lint()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result)
        return result


class PassManager(Pass):
    """Runs passes in order; `modified` is True when any pass modified the module."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified, infos = False, {}
        for p in self.passes:
            res = p(gm)
            gm, modified = res.module, modified or res.modified
            infos[type(p).__name__] = res.info
        return PassResult(gm, modified, infos)
