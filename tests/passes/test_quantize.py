"""int8 through onnxruntime's quantiser: the file runs in onnxruntime, holds integer ops,
and on real digits its accuracy is within 1 point of the float model's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim
from fxslim.errors import ArgumentError, ExportError
from fxslim.passes.fold_bn import fold_batchnorm
from fxslim.passes.quantize import onnx_accuracy, quantize_onnx
from fxslim.runtime.examples import accuracy, digits_loaders, fit


def small_cnn() -> nn.Module:
    """Two conv+BN+ReLU layers and a Linear head: ~97% on digits after 4 epochs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    torch.manual_seed(0)
    train, val = digits_loaders(seed=0)
    model = fit(small_cnn(), train, epochs=4, lr=3e-3, seed=0)
    x = next(iter(val))[0][:1]
    folded = fold_batchnorm(model, x)
    path = tmp_path_factory.mktemp("q") / "digits.onnx"
    fxslim.export_onnx(folded, x, path)
    return model, folded, path, train, val


def test_static_int8_digits_accuracy(digits, tmp_path):
    model, folded, path, train, val = digits
    calibration = [b for _, b in zip(range(8), train)]
    rep = quantize_onnx(path, tmp_path / "int8.onnx", calibration=calibration)
    assert rep.mode == "static" and rep.int8_ops.get("QuantizeLinear", 0) > 0
    assert rep.file_bytes < path.stat().st_size  # int8 weights
    acc_float, acc_folded = accuracy(model, val), accuracy(folded, val)
    acc_onnx, acc_int8 = onnx_accuracy(path, val), onnx_accuracy(rep.path, val)
    print(
        f"digits accuracy: float {acc_float:.4f} folded {acc_folded:.4f} onnx {acc_onnx:.4f} int8 {acc_int8:.4f}"
    )
    assert acc_float > 0.9
    assert acc_folded == acc_onnx == acc_float  # folding and export are exact up to rounding
    assert abs(acc_int8 - acc_float) <= 0.01
    assert rep.max_diff < 0.1  # scaled logits: int8 rounding, not a broken graph


def test_dynamic_int8_linear_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(4, 64)
    fxslim.export_onnx(model, x, tmp_path / "mlp.onnx")
    rep = quantize_onnx(
        tmp_path / "mlp.onnx", tmp_path / "mlp.int8.onnx"
    )  # auto: no conv -> dynamic
    assert rep.mode == "dynamic" and rep.int8_ops.get("MatMulInteger", 0) >= 2
    # within 5% of the output's scale on every CPU: without VNNI that needs 7-bit weights
    # ("auto"; full range measured 0.14 on an AVX2 EPYC)
    assert rep.max_diff < 0.05


def test_bad_requests(digits, tmp_path):
    _, _, path, _, _ = digits
    with pytest.raises(ArgumentError):
        quantize_onnx(path, tmp_path / "a.onnx", mode="static")  # no calibration
    with pytest.raises(ArgumentError):
        quantize_onnx(path, tmp_path / "a.onnx", mode="int4")
    with pytest.raises(ArgumentError):
        quantize_onnx(path, tmp_path / "a.onnx", reduce_range="yes")
    with pytest.raises(ExportError):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "a.onnx")
    (tmp_path / "b.onnx").write_bytes(b"x")
    with pytest.raises(ExportError):  # exists, no overwrite
        quantize_onnx(path, tmp_path / "b.onnx", mode="dynamic")
    assert not (tmp_path / "a.onnx").exists()
