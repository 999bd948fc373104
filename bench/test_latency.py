"""pytest-benchmark: CPU latency of original vs pruned (ratio 0.5, widths rounded to 8),
torch eager and onnxruntime, batch 1, threads pinned.

    python -m pytest bench/test_latency.py --benchmark-group-by=param:name
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxslim
from fxslim.passes.export import onnx_session, run_onnx

HEADS = {"resnet18": "fc", "mobilenet_v2": "classifier.1"}


@pytest.fixture(scope="module", params=list(HEADS))
def variants(request, tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    name = request.param
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    small = fxslim.prune(model, x, 0.5, ignore=[HEADS[name]], round_to=8)
    d = tmp_path_factory.mktemp(name)
    out = {}
    for label, m in (("original", model), ("pruned", small)):
        path = fxslim.export_onnx(m, x, d / f"{label}.onnx").path
        out[label] = (m, onnx_session(path, threads=2))
    return out, x


@pytest.mark.parametrize("variant", ["original", "pruned"])
def test_torch_eager(benchmark, variants, variant):
    models, x = variants
    m = models[variant][0]
    with torch.inference_mode():
        y = benchmark(m, x)
    assert y.shape == (1, 1000)


@pytest.mark.parametrize("variant", ["original", "pruned"])
def test_onnxruntime(benchmark, variants, variant):
    models, x = variants
    sess = models[variant][1]
    y = benchmark(run_onnx, sess, (x,))
    assert y[0].shape == (1, 1000)
