"""Running one step into a folder that only becomes visible once the step finished.

Shared by the run directory engine (`fxslim.pipeline.runner`) and the one-step subcommands
(`fxslim.pipeline.oneshot`): a step writes into a temporary folder, with the ``fxslim``
log captured in ``log.txt`` and torch seeded; ``step.json`` (its record: kind, options,
seconds, metrics) is written last, and the folder is renamed into place by the caller. A
step that fails or is interrupted leaves only the temporary folder, which the caller
removes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fxslim.pipeline.steps import STEPS, StepContext

__all__ = ["STEP_FILE", "TMP", "execute", "replace_dir", "write_json"]

STEP_FILE = "step.json"
TMP = ".tmp-"


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` atomically (a temporary file renamed into place)."""
    tmp = path.with_name(f"{TMP}{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`, replacing an earlier `final` (the caller
    checked that it may): the old one is moved aside first, so `final` is never half old."""
    if final.exists():
        old = final.with_name(f"{TMP}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def execute(kind: str, ctx: StepContext, opts: Any, tmp: Path, record: dict) -> dict:
    """Run step `kind` into the existing folder `tmp`; returns its record (`record` plus kind,
    seconds, options and metrics), which is also written to ``tmp/step.json``, last."""
    import torch

    handler = logging.FileHandler(tmp / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    lib = logging.getLogger("fxslim")
    lib.addHandler(handler)
    old_level = lib.level
    lib.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(ctx.cfg.seed)
        metrics = STEPS[kind](ctx, opts, tmp)
        record = record | {"kind": kind, "seconds": time.perf_counter() - t0,
                           "options": opts.model_dump(mode="json") if opts else None, "metrics": metrics}
        handler.close()
        write_json(tmp / STEP_FILE, record)
        return record
    finally:
        lib.removeHandler(handler)
        lib.setLevel(old_level)
        handler.close()
