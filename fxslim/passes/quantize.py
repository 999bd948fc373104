"""int8 for CPU deployment: onnxruntime's quantiser over a verified float ONNX file.

Linear-quantisation maps a float tensor x to ``q = clamp(round(x / scale) + zero, lo, hi)``
and back as ``x ~ scale * (q - zero)``. Weights are int8, symmetric (zero = 0) and, with
``per_channel``, one scale per output channel, ``scale_o = max|W_o| / 127``, so a
channel of small weights is not flattened by a large one elsewhere. Activations are
uint8 with a scale and zero point per tensor:

* **static** (convolutional models): the ranges come from running the float model on
  calibration batches (min/max); the file holds QuantizeLinear/DequantizeLinear pairs
  (QDQ format) that onnxruntime fuses into integer kernels (QLinearConv, QGemm, ...;
  VNNI's u8 x s8 dot products where the CPU has them);
* **dynamic** (Linear-heavy models, transformers): weights quantised ahead of time,
  each activation's range measured per call (DynamicQuantizeLinear + MatMulInteger);
  no calibration data.

The result is an ONNX file, not a torch module: fxslim's save/load plan does not record
int8 (the float model it came from does). The written file is checked to load and run
in onnxruntime on a calibration (or random) batch, and its largest output difference
from the float file is reported. Accuracy is measured, never assumed: `onnx_accuracy`.

Example:
    >>> fxslim.export_onnx(small, x, "small.onnx")
    >>> rep = quantize_onnx("small.onnx", "small.int8.onnx", calibration=[x for x, _ in train][:8])
    >>> onnx_accuracy(rep.path, val)
    0.97
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxslim.errors import ArgumentError, ExportError
from fxslim.passes.export import onnx_session, run_onnx
from fxslim.runtime.measure import cpu_info
from fxslim.utils import as_path, check_output_file, folders_made

__all__ = ["QuantizeReport", "onnx_accuracy", "quantize_onnx"]

logger = logging.getLogger(__name__)

MODES = ("auto", "static", "dynamic")


@dataclass
class QuantizeReport:
    """What `quantize_onnx` did: the file, the mode used, how many nodes of each integer
    op the file holds, its size, and max |int8 - float| / max |float| on the check batch."""

    path: str
    mode: str
    int8_ops: dict[str, int]
    file_bytes: int
    max_diff: float


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of input tuples."""

    def __init__(self, names: list[str], batches: list[tuple]):
        self.items = iter(
            [{n: t.detach().cpu().numpy() for n, t in zip(names, b)} for b in batches]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def rewind(self) -> None:  # pragma: no cover - called by some onnxruntime versions
        pass


def _as_batches(calibration: Iterable[Any] | None) -> list[tuple]:
    out = []
    for b in calibration or ():
        if isinstance(b, torch.Tensor):
            out.append((b,))
        elif isinstance(b, (list, tuple)) and b and isinstance(b[0], torch.Tensor):
            out.append(
                (b[0],) if len(b) == 2 and b[1].dtype in (torch.int64, torch.int32) else tuple(b)
            )
        else:
            raise ArgumentError(
                f"calibration items must be tensors, tuples of tensors or (x, label) pairs, "
                f"got {type(b).__name__}"
            )
    return out


def _op_counts(path: str) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for n in onnx.load(path, load_external_data=False).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _u8s8_saturates() -> bool:
    """An x86 CPU without VNNI (its int8 dot products go through 16-bit pair sums)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False
    flags = cpu_info()[1]
    if not flags:
        return True  # unknown x86: the safe side
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantize_onnx(
    float_path: str | os.PathLike,
    path: str | os.PathLike,
    *,
    mode: str = "auto",
    calibration: Iterable[Any] | None = None,
    per_channel: bool = True,
    reduce_range: bool | str = "auto",
    overwrite: bool = False,
) -> QuantizeReport:
    """Write an int8 copy of a float ONNX file (see the module docstring).

    Args:
        float_path: a float file (e.g. from `fxslim.export_onnx`).
        path: where to write the int8 file.
        mode: "static" (needs `calibration`), "dynamic", or "auto": static when the file
            has a Conv and calibration is given, else dynamic.
        calibration: input batches (tensors, tuples, or a DataLoader's (x, y) pairs).
        per_channel: one weight scale per output channel.
        reduce_range: 7-bit weights. onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI
            (AVX2, AVX-512 without VNNI) add pairs of products in 16 bits, which saturate
            with full-range weights; "auto" turns it on there (measured on an AVX2 EPYC: a
            two-layer MLP's dynamic int8 output off by 0.14 of its scale, 0.02 with it).
        overwrite: replace an existing file at `path`.

    Raises:
        ExportError: the quantiser failed or its file does not run in onnxruntime;
            nothing is left at `path` then.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    src, path = as_path(float_path, ExportError), as_path(path, ExportError)
    if not src.exists():
        raise ExportError(f"{src} does not exist")
    check_output_file(path, overwrite, ExportError)
    batches = _as_batches(calibration)
    if mode == "auto":
        mode = "static" if batches and _op_counts(str(src)).get("Conv", 0) else "dynamic"
    if mode == "static" and not batches:
        raise ArgumentError("static quantisation needs calibration batches")
    if reduce_range == "auto":
        reduce_range = _u8s8_saturates()
    elif not isinstance(reduce_range, bool):
        raise ArgumentError(f"reduce_range must be True, False or 'auto', got {reduce_range!r}")
    names = [i.name for i in onnx_session(src).get_inputs()]
    with folders_made(path.parent):
        tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            pre, tmp = str(tmpdir / "pre.onnx"), str(tmpdir / path.name)
            try:
                quant_pre_process(str(src), pre, skip_symbolic_shape=True)
            except Exception as exc:  # noqa: BLE001 - the pre-pass is an optimisation
                logger.info("quant_pre_process failed (%s); quantising the file as it is", exc)
                shutil.copy(src, pre)
            try:
                if mode == "static":
                    quantize_static(
                        pre,
                        tmp,
                        _Batches(names, batches),
                        quant_format=QuantFormat.QDQ,
                        per_channel=per_channel,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=reduce_range,
                    )
                else:
                    quantize_dynamic(pre, tmp, per_channel=per_channel, reduce_range=reduce_range,
                                     weight_type=QuantType.QInt8)
            except Exception as exc:
                raise ExportError(
                    f"onnxruntime's {mode} quantiser failed on {src}: {type(exc).__name__}: {exc}"
                ) from exc
            diff = _check(str(src), tmp, names, batches)
            counts = {
                k: v
                for k, v in _op_counts(tmp).items()
                if k
                in (
                    "QuantizeLinear",
                    "DequantizeLinear",
                    "DynamicQuantizeLinear",
                    "MatMulInteger",
                    "ConvInteger",
                    "QLinearConv",
                    "QLinearMatMul",
                )
            }
            size = os.path.getsize(tmp)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    return QuantizeReport(str(path), mode, counts, size, diff)


def _check(float_path: str, int8_path: str, names: list[str], batches: list[tuple]) -> float:
    """Load and run the int8 file; max |int8 - float| / max |float| on one batch."""
    sess_f = onnx_session(float_path)
    try:
        sess_q = onnx_session(int8_path)
    except Exception as exc:
        raise ExportError(f"the int8 file does not load in onnxruntime: {exc}") from exc
    if batches:
        xs = batches[0]
    else:
        g = torch.Generator().manual_seed(0)
        xs = tuple(
            torch.randn([d if isinstance(d, int) else 2 for d in i.shape], generator=g)
            for i in sess_f.get_inputs()
        )
    ref, got = run_onnx(sess_f, xs), run_onnx(sess_q, xs)
    worst = 0.0
    for r, o in zip(ref, got):
        if r.shape != o.shape or not np.isfinite(o).all():
            raise ExportError(
                f"the int8 file gives output {o.shape} (finite: {np.isfinite(o).all()}), "
                f"the float file {r.shape}"
            )
        worst = max(worst, float(np.abs(o - r).max() / (np.abs(r).max() + 1e-12)))
    return worst


def onnx_accuracy(
    path: str | os.PathLike, data: Iterable[Any], threads: int | None = None
) -> float:
    """Top-1 accuracy in [0, 1] of an ONNX classifier in onnxruntime over (x, label) batches."""
    sess = onnx_session(path, threads)
    right = total = 0
    for x, y in data:
        logits = run_onnx(sess, (x,))[0]
        right += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    return right / max(total, 1)
