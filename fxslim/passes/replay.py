"""Replay a recorded rewrite step (``{"pass": ...}`` in ``fxslim_history``) for `fxslim.load`.

Each rewrite pass appends one JSON-able step naming what it changed. Replaying runs the
same pass on the freshly traced (and re-pruned) architecture and checks that it changes
exactly what the record names: the structure is then the saved one, and `load` assigns
the saved weights over it. Folding and fusion are deterministic in the graph, so the
check catches an architecture that differs; low-rank replays the recorded ranks. int8
is not a step: it lives in the ONNX file `fxslim.passes.quantize` writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from fxslim.errors import SaveLoadError
from fxslim.passes.base import Pass
from fxslim.passes.drop_identity import DropIdentitiesPass
from fxslim.passes.fold_bn import FoldBatchNormPass
from fxslim.passes.fold_constants import FoldConstantsPass
from fxslim.passes.fuse_linear import FuseLinearPass
from fxslim.passes.lowrank import LowRankPass

__all__ = ["REPLAYS", "replay"]

# step name -> (the pass that replays it, the info key that must equal the record's)
REPLAYS: dict[str, tuple[Callable[[dict[str, Any]], Pass], str]] = {
    "fold_batchnorm": (lambda step: FoldBatchNormPass(), "folded"),
    "fold_constants": (lambda step: FoldConstantsPass(), "folded"),
    "drop_identities": (lambda step: DropIdentitiesPass(), "dropped"),
    "fuse_linear": (lambda step: FuseLinearPass(force=bool(step.get("force", False))), "fused"),
    "lowrank": (lambda step: LowRankPass(ranks=step["ranks"]), "ranks"),
}


def replay(gm: fx.GraphModule, step: dict[str, Any], index: int = 0) -> fx.GraphModule:
    """`gm` with the recorded rewrite `step` applied again.

    Raises:
        SaveLoadError: an unknown step, or the pass changes other layers than recorded.
    """
    name = step.get("pass")
    if name not in REPLAYS:
        raise SaveLoadError(f"step {index}: unknown rewrite {name!r} (known: {sorted(REPLAYS)})")
    make, key = REPLAYS[name]
    gm.eval()  # rewrites are inference transformations (eval-mode dropout and BatchNorm)
    try:
        res = make(step)(gm)
    except Exception as exc:
        raise SaveLoadError(
            f"step {index} ({name}) cannot be replayed on the model given: {exc}"
        ) from exc
    if res.info[key] != step[key]:
        raise SaveLoadError(
            f"step {index} ({name}): replaying changed {res.info[key]!r}, the save records "
            f"{step[key]!r}: the model given is not the one saved"
        )
    return res.module
