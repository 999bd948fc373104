"""Save and load pruned models without pickle.

A save directory holds two files:

* ``plan.json``: format tag, fxslim and torch versions, the sha256 fingerprint of the
  source architecture, the example input shapes, and the pruning history (per step,
  per changed group: its root member and the kept channel indices), plus the sha256 of
  the weights file;
* ``weights.safetensors``: every parameter and buffer of the pruned model.

`load` traces a fresh instance of the original architecture, re-applies the plan
steps, checks every tensor name and shape, and assigns the weights. Nothing in the
files is executed. Saving writes a sibling temporary directory and swaps it in by
rename, so an interrupted save leaves the previous save intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxslim.errors import FxslimError, SaveLoadError
from fxslim.graph.analysis import analyze
from fxslim.graph.trace import trace
from fxslim.passes.prune import apply_plan, find_recorded_group, make_plan

__all__ = ["PLAN_FORMAT", "load", "save", "save_pt2"]

logger = logging.getLogger(__name__)

PLAN_FORMAT = "fxslim-plan/1"
PLAN, WEIGHTS = "plan.json", "weights.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(model: fx.GraphModule, directory: str | os.PathLike) -> Path:
    """Save a model produced by fxslim (pruned or just traced) to `directory`.

    Args:
        model: a GraphModule returned by `fxslim.trace`, `prune` or `prune_channels`.
        directory: the save directory (created or replaced atomically).

    Returns:
        The directory path.

    Example:
        >>> fxslim.save(small, "out/resnet18-50")
        >>> again = fxslim.load("out/resnet18-50", model=torchvision.models.resnet18())
    """
    from safetensors.torch import save_file

    import fxslim

    meta = getattr(model, "meta", {}) or {}
    if "fxslim_source" not in meta:
        raise SaveLoadError("save() takes a model produced by fxslim (trace, prune or prune_channels)")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": PLAN_FORMAT})
        _fsync(tmp / WEIGHTS)
        plan = {
            "format": PLAN_FORMAT,
            "fxslim_version": fxslim.__version__,
            "torch_version": torch.__version__,
            "source_fingerprint": meta["fxslim_source"],
            "inputs": meta.get("fxslim_inputs", []),
            "steps": meta.get("fxslim_history", []),
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
        }
        (tmp / PLAN).write_text(json.dumps(plan, indent=1))
        _fsync(tmp / PLAN)
        old = target.parent / f".{target.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_plan(target: Path) -> dict[str, Any]:
    path = target / PLAN
    if not path.exists():
        old = target.parent / f".{target.name}.old"
        if (old / PLAN).exists():  # a save was interrupted between its two renames
            logger.warning("loading the previous save of %s (an interrupted save left it aside)", target)
            return _read_plan(old) | {"_dir": str(old)}
        raise SaveLoadError(f"{path} does not exist")
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaveLoadError(f"{path} is not valid JSON (corrupt or truncated): {exc}") from exc
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise SaveLoadError(f"{path} is not an fxslim plan (format {plan.get('format') if isinstance(plan, dict) else None!r})")
    for key in ("source_fingerprint", "inputs", "steps", "weights_sha256", "tensors"):
        if key not in plan:
            raise SaveLoadError(f"{path} lacks '{key}'")
    return plan


def load(directory: str | os.PathLike, model: nn.Module) -> fx.GraphModule:
    """Load a saved model onto a fresh instance of its original architecture.

    Args:
        directory: a directory written by `save`.
        model: a fresh instance of the architecture that was pruned (left untouched).

    Returns:
        The pruned GraphModule with the saved weights, in eval mode.

    Raises:
        SaveLoadError: corrupt or truncated files, another architecture, missing, extra
            or misshapen tensors. Nothing is modified when it is raised.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    target = Path(directory)
    plan = _read_plan(target)
    folder = Path(plan.pop("_dir", target))
    weights = folder / WEIGHTS
    if not weights.exists():
        raise SaveLoadError(f"{weights} does not exist")
    if _sha256(weights) != plan["weights_sha256"]:
        raise SaveLoadError(f"{weights} does not match {PLAN} (other or modified weights file)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SaveLoadError(f"{weights} is corrupt or truncated: {exc}") from exc

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}
    try:
        inputs = tuple(torch.zeros(s["shape"], dtype=dtypes[s["dtype"]]) for s in plan["inputs"])
    except (KeyError, TypeError) as exc:
        raise SaveLoadError(f"{PLAN} has malformed input specs: {plan['inputs']}") from exc
    was_training = model.training
    try:
        gm = trace(model.eval(), inputs, share_weights=True)
    except FxslimError as exc:
        raise SaveLoadError(f"the model given cannot be traced like the saved one: {exc}") from exc
    finally:
        model.train(was_training)
    if gm.meta["fxslim_source"] != plan["source_fingerprint"]:
        raise SaveLoadError(
            f"the model given ({type(model).__name__}) is not the architecture that was saved "
            "(fingerprints differ): pass a fresh instance of the original model"
        )
    for i, step in enumerate(plan["steps"]):
        cg = analyze(gm)
        removal = {}
        for entry in step.get("groups", []):
            grp = find_recorded_group(cg, entry)
            if grp is None or grp.size != entry["size"]:
                raise SaveLoadError(f"step {i}: no group of size {entry['size']} rooted at {entry['root']}")
            kept = set(entry["kept"])
            removal[grp.id] = [u for u in range(grp.size) if u not in kept]
        gm = apply_plan(gm, cg, make_plan(cg, removal), inputs, inplace=True)

    want = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise SaveLoadError(f"{weights}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    wrong = [f"{k}: file {got[k]}, model {want[k]}" for k in want if want[k] != got[k]]
    if wrong:
        raise SaveLoadError(f"{weights}: wrong shapes: {wrong[:5]}")
    gm.load_state_dict(tensors, strict=True, assign=True)
    return gm.eval()


def save_pt2(model: nn.Module, example_inputs: Any, path: str | os.PathLike) -> Path:
    """Also offered: a `torch.export` program (.pt2) for users who deploy with it."""
    from fxslim.graph.trace import as_input_tuple

    path = Path(path)
    prog = torch.export.export(model.eval(), as_input_tuple(example_inputs))
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent if path.parent.exists() else None)
    os.close(fd)
    try:
        torch.export.save(prog, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
