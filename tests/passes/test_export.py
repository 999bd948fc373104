"""ONNX export pass: verification, report, and nothing half-written on failure."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import fxslim
from fxslim.passes import export as E


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.a(x)
        y = y + self.b(y)
        return self.fc(y.mean((2, 3)))


X = torch.randn(1, 3, 16, 16)


def test_export_verifies_pruned_model_and_dynamic_batch(tmp_path):
    small = fxslim.prune(Small().eval(), X, 0.5)
    assert type(small) is Small and small.a[0].out_channels == 4  # the user's classes (the default form)
    rep = fxslim.export_onnx(small, X, tmp_path / "s.onnx")
    assert rep.max_diff <= 1e-4 and rep.batch_sizes == (1, 3)
    assert rep.nodes_after <= rep.nodes_before and rep.file_bytes == (tmp_path / "s.onnx").stat().st_size
    proto = onnx.load(tmp_path / "s.onnx")
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: i for i in proto.graph.initializer}
    assert any(list(i.dims)[:1] == [4] for i in inits.values())  # the pruned width is in the file
    sess = E.onnx_session(tmp_path / "s.onnx")
    x5 = torch.randn(5, 3, 16, 16)
    got = E.run_onnx(sess, (x5,))[0]
    with torch.inference_mode():
        np.testing.assert_allclose(got, small(x5).numpy(), rtol=1e-4, atol=1e-5)



def test_graph_captured_at_fixed_shapes_exports_at_its_batch(tmp_path, caplog):
    """A torch.export capture has its sizes as literals and a guard on the input shapes
    (timm's ConViT, CaiT ... fall back to it): the default dynamic batch cannot run it,
    so the export keeps the example's batch and says so, instead of failing."""
    small = fxslim.prune(Small().eval(), X, 0.5, capture="export", keep_classes=False)
    assert isinstance(small, torch.fx.GraphModule) and small.meta["fxslim_capture"]["kind"] == "export"
    with caplog.at_level("WARNING", logger="fxslim.passes.export"):
        rep = fxslim.export_onnx(small, X, tmp_path / "g.onnx")
    assert rep.batch_sizes == (1,) and rep.max_diff <= 1e-4
    assert "fixed input shapes" in caplog.text and "dynamic_batch=False" in caplog.text


def test_a_batch_written_in_the_code_exports_at_that_batch(tmp_path, caplog):
    class FixedBatch(nn.Module):  # reshape(1, ...): as a pruned graph's size literals do
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 16 * 16, 4)

        def forward(self, x):
            return self.fc(x.reshape(1, -1))

    with caplog.at_level("WARNING", logger="fxslim.passes.export"):
        rep = fxslim.export_onnx(FixedBatch().eval(), X, tmp_path / "f.onnx")
    assert rep.batch_sizes == (1,) and rep.max_diff <= 1e-4
    assert "does not export with a dynamic batch" in caplog.text

def test_mismatch_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    real = E.run_onnx
    monkeypatch.setattr(E, "run_onnx", lambda s, xs: [o + 1.0 for o in real(s, xs)])
    with pytest.raises(fxslim.ExportError, match="differs from torch"):
        fxslim.export_onnx(Small().eval(), X, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unexportable_model_is_a_typed_error(tmp_path):
    class Py(nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[0, 0]).real  # no ONNX op for eigenvalues

    with pytest.raises(fxslim.ExportError, match="failed"):
        fxslim.export_onnx(Py(), X, tmp_path / "py.onnx")
    assert list(tmp_path.iterdir()) == []


def test_large_models_get_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "_ONE_FILE_LIMIT", 0)  # pretend the weights pass protobuf's 2 GB
    rep = fxslim.export_onnx(Small().eval(), X, tmp_path / "big.onnx")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "big.onnx" and len(files) == 2 and not rep.simplified
    assert rep.max_diff <= 1e-4
    assert E.run_onnx(E.onnx_session(tmp_path / "big.onnx"), (X,))[0].shape == (1, 5)


def test_torchscript_fallback_when_dynamo_fails(tmp_path, monkeypatch):
    real = torch.onnx.export

    def picky(*args, dynamo=True, **kw):
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable")
        kw.pop("external_data", None)
        kw.pop("dynamic_shapes", None)
        return real(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", picky)
    rep = fxslim.export_onnx(Small().eval(), X, tmp_path / "ts.onnx")
    assert rep.exporter == "torchscript" and rep.max_diff <= 1e-4 and rep.batch_sizes == (1, 3)


def test_loaded_unpruned_save_exports_with_dynamic_batch(tmp_path):
    """`load` of a save with no pruning steps returns a lazily compiled GraphModule whose
    forward is (*args, **kwargs) until first called; dynamic_shapes could not match it."""
    fxslim.save(fxslim.trace(Small().eval(), X), tmp_path / "s")
    loaded = fxslim.load(tmp_path / "s", Small())
    report = fxslim.export_onnx(loaded, X, tmp_path / "m.onnx")
    assert report.exporter == "dynamo" and report.max_diff < 1e-4 and len(report.batch_sizes) == 2
