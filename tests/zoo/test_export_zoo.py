"""Export to ONNX, verified by onnxruntime, after prune(ratio=0.5): one model of each
structure the exporter meets (plain and bottleneck residuals, depthwise + squeeze-excite,
concat-heavy dense blocks, channel shuffle, fire modules, inception branches, layer-norm
ConvNeXt blocks, attention by heads). The originals export through torch's own exporter
alone. CI's time budget takes these 11; the whole zoo (all 80, original and pruned) is
`python -m bench.export_zoo` (bench/EXPORT_ZOO.md), where maxvit_t, swin_t,
efficientnet_v2_s, inception_v3 and the wide/ResNeXt variants (20-75 s each here) run."""

from __future__ import annotations

import pytest
import torch

import fxslim
from tests.zoo.zoo import build, head_of

FAMILIES = [
    "resnet18", "regnet_y_400mf", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet",
    "shufflenet_v2_x0_5", "squeezenet1_1", "vgg11", "convnext_tiny", "vit_b_32",
]


@pytest.mark.zoo
@pytest.mark.parametrize("name", FAMILIES)
def test_export_family(name, tmp_path):
    torch.set_num_threads(2)
    model, x = build(name)
    x = x[:1]
    small = fxslim.prune(model, x, 0.5, ignore=[head_of(model)])
    rep = fxslim.export_onnx(small, x, tmp_path / "pruned.onnx")
    assert rep.max_diff <= 1e-4, rep
    assert rep.batch_sizes == (1, 3)
