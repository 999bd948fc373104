"""Export to ONNX, verified by onnxruntime, for one model of every torchvision family after
prune(ratio=0.5). The originals export through torch's own exporter alone, so CI leaves
them to the whole-zoo bench, which does both: `python -m bench.export_zoo`."""

from __future__ import annotations

import pytest
import torch

import fxslim
from tests.zoo.zoo import build, head_of

FAMILIES = [
    "resnet18", "resnext50_32x4d", "wide_resnet50_2", "regnet_y_400mf", "mobilenet_v2",
    "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0", "efficientnet_v2_s", "densenet121",
    "googlenet", "inception_v3", "shufflenet_v2_x0_5", "squeezenet1_1", "alexnet", "vgg11",
    "convnext_tiny", "vit_b_32", "swin_t", "maxvit_t",
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
