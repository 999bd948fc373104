"""Save and load pruned models without pickle.

A save directory holds two files:

* ``plan.json``: format tag, fxslim and torch versions, the sha256 fingerprint of the
  source architecture, the example input shapes, and the pruning history (per step,
  per changed group: its root member and the kept channel indices), the form
  (``"module"``: the user's own classes, ``"graph"``: a torch.fx GraphModule), plus the
  sha256 of the weights file; rewrite steps (BatchNorm folding, identity dropping, Linear
  fusion, low-rank factorisation) are steps too, named by ``"pass"`` and replayed by
  ``fxslim.passes.replay``;
* ``weights.safetensors``: every parameter and buffer of the pruned model.

`load` traces a fresh instance of the original architecture, re-applies the plan
steps, checks every tensor name and shape, and assigns the weights; a ``"module"`` save
is then rebuilt as the instance's own classes and proven equal to the graph again
(``fxslim.passes.keep_classes``), so `load` gives back the form that was saved. Nothing in the
files is executed. Saving writes both files under temporary names in the directory and
renames them into place, the plan last, so an interrupted save leaves the previous
save intact; it never deletes or replaces anything it did not write itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxslim._args import check_module
from fxslim._inputs import ExampleInputs
from fxslim.errors import FxslimError, SaveLoadError
from fxslim.graph.analysis import analyze
from fxslim.graph.trace import trace
from fxslim.passes.prune import apply_plan, find_recorded_group, make_plan
from fxslim.passes.replay import replay
from fxslim.utils import as_path, check_output_file, folders_made, fxslim_meta

__all__ = ["PLAN_FORMAT", "load", "save", "save_pt2"]

logger = logging.getLogger(__name__)

PLAN_FORMAT = "fxslim-plan/1"
PLAN, WEIGHTS = "plan.json", "weights.safetensors"
_TMP = ".fxslim-tmp-"  # prefix of save()'s own temporary files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _holds_save(folder: Path) -> bool:
    try:
        plan = json.loads((folder / PLAN).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(plan, dict) and plan.get("format") == PLAN_FORMAT


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse any path whose contents save() did not write."""
    if not target.exists():
        if target.is_symlink():
            raise SaveLoadError(f"'{target}' is a dangling symbolic link; nothing was written")
        return
    if not target.is_dir():
        raise SaveLoadError(f"'{target}' exists and is not a directory; nothing was written "
                            "(save() takes a new or empty directory, or an earlier save with overwrite=True)")
    entries = [e for e in os.listdir(target) if not e.startswith(_TMP)]
    if not entries:
        return
    if not _holds_save(target):
        raise SaveLoadError(f"'{target}' is not empty and holds no fxslim save ({len(entries)} entries, "
                            f"e.g. {sorted(entries)[:3]}); nothing was written: choose a new or empty directory")
    if not overwrite:
        raise SaveLoadError(f"'{target}' already holds an fxslim save; pass overwrite=True to replace it")


def save(model: fx.GraphModule, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a model produced by fxslim (pruned or just traced) to `directory`.

    Only ``plan.json`` and ``weights.safetensors`` are ever written; nothing else at the
    path is touched. The directory must be new, empty, or (with ``overwrite=True``) an
    earlier save. Both files are written under temporary names and renamed into place,
    the plan last, so an interrupted save leaves the previous save (or no save) behind,
    never a half-written one.

    Args:
        model: a model returned by `fxslim.trace`, `prune` or `prune_channels` (a
            GraphModule, or the user's own classes carrying ``model.fxslim_meta``).
        directory: the save directory (created if missing).
        overwrite: replace an earlier fxslim save at `directory`.

    Returns:
        The directory path.

    Raises:
        SaveLoadError: not an fxslim model; the path is a file, a non-empty directory
            that holds no save, an earlier save without ``overwrite``, or not writable.
            Nothing is written or removed when it is raised.

    Example:
        >>> fxslim.save(small, "out/resnet18-50")
        >>> again = fxslim.load("out/resnet18-50", model=torchvision.models.resnet18())
    """
    from safetensors.torch import save_file

    import fxslim

    meta = fxslim_meta(model) if isinstance(model, nn.Module) else {}
    if not isinstance(model, nn.Module) or "fxslim_source" not in meta:
        raise SaveLoadError("save() takes a model produced by fxslim (trace, prune or prune_channels), "
                            f"got {type(model).__name__}")
    target = as_path(directory, SaveLoadError, "directory")
    _check_target(target, overwrite)
    tag = f"{_TMP}{os.getpid()}-"
    w_tmp, p_tmp = target / f"{tag}{WEIGHTS}", target / f"{tag}{PLAN}"
    try:
        with folders_made(target):
            tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
            save_file(tensors, str(w_tmp), metadata={"format": PLAN_FORMAT})
            _fsync(w_tmp)
            plan = {
                "format": PLAN_FORMAT,
                "fxslim_version": fxslim.__version__,
                "torch_version": torch.__version__,
                "source_fingerprint": meta["fxslim_source"],
                "inputs": meta.get("fxslim_inputs", []),
                "steps": meta.get("fxslim_history", []),
                "form": "graph" if isinstance(model, fx.GraphModule) else "module",
                "weights_sha256": _sha256(w_tmp),
                "tensors": {k: list(v.shape) for k, v in tensors.items()},
            }
            p_tmp.write_text(json.dumps(plan, indent=1))
            _fsync(p_tmp)
            # weights first, the plan last: a plan names the sha256 of the weights beside
            # it, so a crash between the two renames cannot load as a wrong model
            os.replace(w_tmp, target / WEIGHTS)
            os.replace(p_tmp, target / PLAN)
        return target
    except OSError as exc:
        raise SaveLoadError(f"cannot save to '{target}': {exc}; nothing was left behind") from exc
    finally:
        for tmp in (w_tmp, p_tmp):
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _read_plan(target: Path) -> dict[str, Any]:
    path = target / PLAN
    if not path.exists():
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
        The pruned model with the saved weights, in eval mode, in the saved form: the
        model's own classes or a GraphModule.

    Raises:
        SaveLoadError: corrupt or truncated files, another architecture, missing, extra
            or misshapen tensors. Nothing is modified when it is raised.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_module("model", model)
    target = as_path(directory, SaveLoadError, "directory")
    plan = _read_plan(target)
    weights = target / WEIGHTS
    if not weights.exists():
        raise SaveLoadError(f"{weights} does not exist")
    if _sha256(weights) != plan["weights_sha256"]:
        raise SaveLoadError(f"{weights} does not match {PLAN} (other or modified weights file)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SaveLoadError(f"{weights} is corrupt or truncated: {exc}") from exc

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "bool": torch.bool,
              "float64": torch.float64, "int64": torch.int64, "int32": torch.int32}
    try:  # ones, not zeros, for integer inputs: an all-zero attention mask would mask every token
        def make(s: dict) -> Any:
            if "items" in s:
                return [make(i) for i in s["items"]]
            dtype = dtypes[s["dtype"]]
            return (torch.zeros if dtype.is_floating_point else torch.ones)(s["shape"], dtype=dtype)
        made = [(s.get("name"), make(s)) for s in plan["inputs"]]
        inputs = ExampleInputs(tuple(t for n, t in made if n is None), {n: t for n, t in made if n is not None})
    except (KeyError, TypeError, AttributeError) as exc:
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
        if "pass" in step:  # a rewrite after (or instead of) pruning: fold, fuse, low-rank ...
            gm = replay(gm, step, i)
            continue
        cg = analyze(gm)
        removal = {}
        for entry in step.get("groups", []):
            grp = find_recorded_group(cg, entry)
            if grp is None or grp.size != entry["size"]:
                raise SaveLoadError(f"step {i}: no group of size {entry['size']} rooted at {entry['root']}")
            kept = set(entry["kept"])
            removal[grp.id] = [u for u in range(grp.size) if u not in kept]
        gm = apply_plan(gm, cg, make_plan(cg, removal), inputs, inplace=True)

    form = plan.get("form", "graph")
    if form not in ("graph", "module"):
        raise SaveLoadError(f"{PLAN} names an unknown form {form!r} (expected 'graph' or 'module')")
    gm_keys = set(gm.state_dict())
    if form == "graph":
        _check_tensors(weights, {k: tuple(v.shape) for k, v in gm.state_dict().items()}, tensors)
    else:  # tensors the graph holds once (tied weights) may be saved under more names
        missing = sorted(gm_keys - set(tensors))
        if missing:
            raise SaveLoadError(f"{weights}: missing tensors {missing[:5]}")
        _check_tensors(weights, {k: tuple(v.shape) for k, v in gm.state_dict().items()},
                       {k: v for k, v in tensors.items() if k in gm_keys})
    gm.load_state_dict({k: v for k, v in tensors.items() if k in gm_keys}, strict=True, assign=True)
    gm.eval()
    if form == "graph":
        return gm
    return _as_classes(model, gm, inputs, tensors, weights)


def _check_tensors(weights: Path, want: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> None:
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise SaveLoadError(f"{weights}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    wrong = [f"{k}: file {got[k]}, model {want[k]}" for k in want if want[k] != got[k]]
    if wrong:
        raise SaveLoadError(f"{weights}: wrong shapes: {wrong[:5]}")


def _as_classes(model: nn.Module, gm: fx.GraphModule, inputs: ExampleInputs, tensors: dict[str, torch.Tensor],
                weights: Path) -> nn.Module:
    """The loaded GraphModule rebuilt as the model's own classes (the form that was saved),
    proven equal to it like at prune time, and holding exactly the saved tensors."""
    from fxslim.passes.keep_classes import keep_classes

    if not isinstance(gm, fx.GraphModule):  # replayed through a run capture: the classes already
        kept = gm
    else:
        was_training = model.training
        try:
            kept = keep_classes(model.eval(), gm, inputs)
        finally:
            model.train(was_training)
    if kept is gm and isinstance(gm, fx.GraphModule):
        raise SaveLoadError(
            f"the save holds {type(model).__name__} as its own classes, but the model given cannot be rebuilt "
            f"so: {gm.meta.get('fxslim_form_reason')}"
        )
    state = kept.state_dict()
    _check_tensors(weights, {k: tuple(v.shape) for k, v in state.items()}, tensors)
    differ = [k for k, v in state.items() if not torch.equal(v, tensors[k])]
    if differ:
        raise SaveLoadError(f"{weights}: tensors {differ[:5]} are one tensor in the model but differ in the file")
    return kept.eval()


def save_pt2(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Also offered: a `torch.export` program (.pt2) for users who deploy with it.

    Raises:
        SaveLoadError: the path is a directory, an existing file without ``overwrite``,
            or not writable; or torch.export cannot export the model.
    """
    from fxslim.graph.trace import as_input_tuple

    path = as_path(path, SaveLoadError)
    check_output_file(path, overwrite, SaveLoadError)
    try:
        prog = torch.export.export(model.eval(), as_input_tuple(example_inputs))
    except FxslimError:
        raise
    except Exception as exc:  # torch.export's own errors are many and untyped
        raise SaveLoadError(f"torch.export cannot export {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    tmp = path.with_name(f"{_TMP}{os.getpid()}-{path.name}")
    try:
        with folders_made(path.parent):
            torch.export.save(prog, str(tmp))
            os.replace(tmp, path)
    except OSError as exc:
        raise SaveLoadError(f"cannot write '{path}': {exc}; nothing was left behind") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path
