"""ONNX export pass: export, simplify, verify.

1. ``torch.onnx.export`` with the dynamo exporter (one file: ``external_data=False``),
   falling back to the TorchScript exporter where dynamo fails;
2. onnxsim simplification (kept only when onnxsim's own check passes);
3. ``onnx.checker`` full check, then onnxruntime (CPU provider) against torch on the
   example inputs and, with a dynamic batch, on a second batch size. The largest
   difference is reported relative to the output's scale; above `tol` it is an error.

One file where it fits: models with more than ~1.8 GB of weights (protobuf's 2 GB cap)
keep them in an external-data file beside it and skip onnxsim. Everything is written to a
temporary directory and moved into place only when verified, so a failed export leaves
nothing at `path`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fxslim._args import check_module, number
from fxslim.errors import ArgumentError, ExportError
from fxslim.graph.capture import no_kv_cache
from fxslim.graph.trace import as_input_tuple
from fxslim.utils import as_path, check_output_file, folders_made

__all__ = ["ExportReport", "export_onnx", "onnx_session", "run_onnx"]

logger = logging.getLogger(__name__)

_ONE_FILE_LIMIT = 1_800_000_000  # bytes of weights above which the file gets external data


@dataclass
class ExportReport:
    """What `export_onnx` did.

    Attributes:
        path: the written file.
        exporter: "dynamo" or "torchscript".
        opset: the default-domain opset of the file.
        nodes_before / nodes_after: node counts before and after onnxsim.
        simplified: whether the simplified graph was kept.
        max_diff: largest |onnxruntime - torch| / max|torch| over the checked batches.
        batch_sizes: the batch sizes verified.
        file_bytes: size of the file (and its external data, if any).
    """

    path: str
    exporter: str
    opset: int
    nodes_before: int
    nodes_after: int
    simplified: bool
    max_diff: float
    batch_sizes: tuple[int, ...]
    file_bytes: int


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime session on the CPU provider (threads pinned when given)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: tuple) -> list[np.ndarray]:
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):  # an HF ModelOutput: its set fields, in order
        return [t for o in out.values() for t in _flat(o)]
    return []


def _export(model: nn.Module, inputs: tuple, path: str, dynamic_batch: bool, opset: int | None,
            external: bool) -> str:
    names = [f"input_{i}" for i in range(len(inputs))]
    errors = []
    if dynamic_batch and all(isinstance(t, torch.Tensor) and t.shape[0] == 1 for t in inputs):
        # torch.export specialises size-1 dims: trace with a batch of 2 to keep it symbolic
        inputs = tuple(torch.cat([t, t]) for t in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dyn = tuple({0: torch.export.Dim("batch", min=1, max=4096)} for _ in inputs) if dynamic_batch else None
            torch.onnx.export(
                model, inputs, path, dynamo=True, external_data=external, dynamic_shapes=dyn,
                opset_version=opset, input_names=names, verbose=False,
            )
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - the dynamo exporter does not take every model
            errors.append(f"dynamo: {type(exc).__name__}: {str(exc)[:300]}")
            logger.info("dynamo export failed, trying TorchScript: %s", exc)
        try:
            axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
            torch.onnx.export(
                model, inputs, path, dynamo=False, opset_version=opset or 17, input_names=names,
                dynamic_axes=axes,
            )
            return "torchscript"
        except Exception as exc:  # noqa: BLE001 - both errors go into the ExportError
            errors.append(f"torchscript: {type(exc).__name__}: {str(exc)[:300]}")
    raise ExportError("torch.onnx.export failed with both exporters:\n  " + "\n  ".join(errors))


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    simplify: bool = True,
    dynamic_batch: bool = True,
    opset: int | None = None,
    tol: float = 1e-4,
    overwrite: bool = False,
) -> ExportReport:
    """Export `model` to a verified ONNX file.

    Args:
        model: the module (eval mode is used for export and checks).
        example_inputs: a tensor or tuple of tensors.
        path: where to write the .onnx file.
        simplify: run onnxsim (kept only if its own check passes).
        dynamic_batch: make dim 0 of every input dynamic and verify a second batch size.
        opset: opset to request (exporter default when None).
        tol: largest allowed |onnxruntime - torch| relative to max |torch|.
        overwrite: replace an existing file at `path`.

    Returns:
        An `ExportReport`.

    Raises:
        ExportError: export failed, the checker rejected the file, or outputs differ;
            `path` is a directory, exists (without `overwrite`) or is not writable.
            Nothing is left at `path` when it is raised.

    Example:
        >>> report = fxslim.export_onnx(small, torch.randn(1, 3, 224, 224), "small.onnx")
        >>> report.max_diff < 1e-4
        True
    """
    check_module("model", model)
    number("tol", tol, 0.0, lo_open=True)
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 7):
        raise ArgumentError(f"opset must be an int >= 7 or None, got {opset!r}")
    inputs = as_input_tuple(example_inputs)
    if getattr(model, "_needs_recompile", lambda: False)():
        # a lazily compiled GraphModule (e.g. from `load` of an unpruned save) has a
        # forward(*args, **kwargs) until its first call, which dynamic_shapes cannot match
        model.real_recompile()
    path = as_path(path, ExportError)
    check_output_file(path, overwrite, ExportError)
    capture = getattr(model, "meta", {}).get("fxslim_capture", {}) if isinstance(model, torch.fx.GraphModule) else {}
    if dynamic_batch and capture.get("kind") in ("export", "run"):
        # a graph captured by torch.export or by running the model has its sizes as
        # literals and a guard on the input shapes: no other batch size can run it
        logger.warning(
            "'%s' is a graph captured at fixed input shapes %s (capture=%r): exported with that "
            "batch only (dynamic_batch=False); capture and prune at the batch you will run, or "
            "export the class-kept model", path.name, capture.get("input_shapes"), capture["kind"])
        dynamic_batch = False
    try:
        with folders_made(path.parent), no_kv_cache(model):  # an HF cache object is no ONNX output
            return _export_verified(model, inputs, path, simplify, dynamic_batch, opset, tol)
    except OSError as exc:
        raise ExportError(f"cannot write '{path}': {exc}; nothing was left behind") from exc


def _export_verified(model: nn.Module, inputs: tuple, path: Path, simplify: bool, dynamic_batch: bool,
                     opset: int | None, tol: float) -> ExportReport:
    import onnx

    was_training = model.training
    model.eval()
    # protobuf caps one file at 2 GB: larger models keep their weights in a side file
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    external = nbytes > _ONE_FILE_LIMIT
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tmp = str(tmpdir / path.name)
    try:
        try:
            exporter = _export(model, inputs, tmp, dynamic_batch, opset, external)
        except ExportError as exc:
            if not dynamic_batch:
                raise
            # a size written into the code (a pruned graph's literal batch, view(1, ...))
            # fixes the batch: export at the example's batch rather than not at all
            try:
                exporter = _export(model, inputs, tmp, False, opset, external)
            except ExportError:
                raise exc from None
            logger.warning(
                "%s does not export with a dynamic batch (%s); exported at batch %s only (dynamic_batch=False)",
                type(model).__name__, str(exc).splitlines()[1].strip()[:200],  # _export's "dynamo: ..." line
                inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) else "?")
            dynamic_batch = False
        proto = onnx.load(tmp, load_external_data=False)
        nodes_before = len(proto.graph.node)
        simplified = False
        if simplify and not external:
            try:
                import onnxsim

                simp, ok = onnxsim.simplify(proto)
                if ok:
                    proto, simplified = simp, True
                    onnx.save(proto, tmp)
            except Exception as exc:  # noqa: BLE001 - onnxsim is an optimisation: keep the exported graph
                logger.warning("onnxsim failed, keeping the unsimplified graph: %s", exc)
        try:
            onnx.checker.check_model(tmp, full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the exported file: {exc}") from exc
        batches = [inputs]
        if dynamic_batch:
            n = inputs[0].shape[0] + 2 if inputs and isinstance(inputs[0], torch.Tensor) else 3
            g = torch.Generator().manual_seed(0)
            batches.append(tuple(
                torch.randn((n, *t.shape[1:]), generator=g).to(t.dtype) if t.is_floating_point()
                else t[:1].expand(n, *t.shape[1:]).clone() for t in inputs
            ))
        session = onnx_session(tmp)
        worst = 0.0
        for xs in batches:
            with torch.inference_mode():
                ref = [t.float() for t in _flat(model(*xs))]
            got = run_onnx(session, xs)
            if len(got) != len(ref):
                raise ExportError(f"onnxruntime returned {len(got)} outputs, torch {len(ref)}")
            for r, o in zip(ref, got):
                if tuple(o.shape) != tuple(r.shape):
                    raise ExportError(f"output shape {tuple(o.shape)} from onnxruntime, {tuple(r.shape)} from torch")
                scale = float(r.abs().max()) + 1e-12
                worst = max(worst, float(np.abs(o - r.numpy()).max()) / scale)
        if worst > tol:
            raise ExportError(f"onnxruntime output differs from torch by {worst:.3e} (scaled), above {tol}")
        opset_v = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        size = sum(f.stat().st_size for f in tmpdir.iterdir())
        for f in sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name):  # the .onnx last
            os.replace(f, path.parent / f.name)
        return ExportReport(
            str(path), exporter, opset_v, nodes_before, len(proto.graph.node), simplified, worst,
            tuple(int(xs[0].shape[0]) for xs in batches), size,
        )
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"export to {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        model.train(was_training)
