"""torchvision detectors through the run capture: backbone, FPN and heads pruned, proven.

ssdlite320_mobilenet_v3_large and fasterrcnn_mobilenet_v3_large_320_fpn cannot be traced
by torch.fx (image lists, data-dependent control flow) nor exported (data-dependent
guards in the postprocessing), so fxslim records one eager run (`capture="run"`,
`fxslim.graph.run_capture`). Each model, random weights and BN statistics:

* the only pinned groups are the image input's RGB channels and the heads' output layers
  (anchors x classes, anchors x box coordinates, read by the postprocessing's decoding,
  score thresholds and NMS, which have no rule): these stay whole, ignored or not;
* dead-channel oracle on random channels of every prunable group: the outputs of the
  raw heads (SSDlite's head; Faster R-CNN's RPN head and box predictor) are equal. The
  detections themselves are compared by structure only: random weights give near-equal
  scores to thousands of anchors and proposals, so float rounding (summing fewer zero
  terms) can flip a top-k or NMS tie (seen: 1e-3 on Faster R-CNN with one thread, 1e-7
  with two);
* ratio 0.5 with the heads' output layers ignored: the result is the user's class
  (``SSD``, ``FasterRCNN``) with sliced tensors (slicing oracle) and consistent size
  attributes, keeps at most 40% of the MACs, and returns detections of the same structure.

Three classes instead of 91 (the output layers stay whole either way) and 160-pixel
images keep the postprocessing, and the file, short on 2 cores.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import fxslim
from fxslim.passes.policy import uniform_removal
from fxslim.passes.prune import apply_plan, make_plan
from fxslim.passes.verify import dead_channel_check, slicing_mismatches
from fxslim.runtime.measure import FlopCounter
from tests.zoo.zoo import _attributes_agree, _randomise_norms, random_removal

torchvision = pytest.importorskip("torchvision")

RTOL, ATOL = 1e-4, 1e-5

_SSD_OUT = [
    f"head.{h}.module_list.{i}.1"
    for h in ("classification_head", "regression_head")
    for i in range(6)
]
_RCNN_OUT = [
    "rpn.head.cls_logits",
    "rpn.head.bbox_pred",
    "roi_heads.box_predictor.cls_score",
    "roi_heads.box_predictor.bbox_pred",
]
# name -> (builder keywords, output layers kept whole, modules whose outputs the dead-channel oracle compares)
MODELS = {
    "ssdlite320_mobilenet_v3_large": ({"num_classes": 3}, _SSD_OUT, ["head"]),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        {"num_classes": 3, "min_size": 160, "max_size": 160, "box_score_thresh": 0.0},
        _RCNN_OUT,
        ["rpn.head", "roi_heads.box_predictor"],
    ),
}
FIRST_CONV = {
    "ssdlite320_mobilenet_v3_large": "backbone.features.0.0.0",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "backbone.body.0.0",
}


def build(name: str):
    kw = MODELS[name][0]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kw).eval()
    _randomise_norms(model, 0)
    images = [torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(0))]
    return model, (images,)


def _run_counting(model, x):
    with FlopCounter() as counter, torch.inference_mode():
        out = model(*x)
    return out, counter.get_total_flops() // 2


def _structure(detections) -> list:
    """Per image: its keys, and per key the tensor's dtype and rank, boxes (N, 4)."""
    assert isinstance(detections, list)
    out = []
    for d in detections:
        n = d["boxes"].shape[0]
        assert (
            d["boxes"].shape == (n, 4) and d["scores"].shape == (n,) and d["labels"].shape == (n,)
        )
        out.append(sorted((k, v.dtype, v.dim()) for k, v in d.items()))
    return out


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(MODELS))
def test_detector_prunes_backbone_fpn_and_heads(name):
    model, x = build(name)
    _, outputs, compare_at = MODELS[name]
    gm = fxslim.trace(model, x, capture="run", share_weights=True)
    assert gm.meta["fxslim_capture"]["kind"] == "run"
    cg = fxslim.analyze(gm)
    pinned = {g.root.module for g in cg.groups if not g.prunable}
    # pinned: the input's RGB and the output layers only
    assert pinned <= {*outputs, FIRST_CONV[name]}, pinned
    assert all("at '" in g.reason for g in cg.groups if not g.prunable)  # op and module path named

    # oracle 2 (dead channels) on every statistic-free prunable group at once
    removal = random_removal(cg, np.random.default_rng(0))
    assert len(removal) >= 30
    diff, pruned, plan = dead_channel_check(gm, cg, removal, x, at=compare_at)
    assert diff <= RTOL + ATOL, f"dead-channel equivalence broken: {diff:.3e}"
    assert slicing_mismatches(gm, pruned, plan) == []  # oracle 1
    del pruned

    # ratio 0.5, the output layers whole
    ref, macs0 = _run_counting(model, x)
    plan = make_plan(cg, uniform_removal(gm, cg, 0.5, outputs))
    small = apply_plan(gm, cg, plan, x)
    assert type(small) is type(model)
    assert slicing_mismatches(gm, small, plan) == []
    assert _attributes_agree(small) == []
    out, macs1 = _run_counting(small, x)
    assert _structure(out) == _structure(ref)
    assert all(torch.isfinite(d["boxes"]).all() for d in out)
    kept = macs1 / macs0
    assert kept <= 0.40, f"{name} keeps {kept:.1%} of its MACs"
    if name.startswith("fasterrcnn"):  # the FPN, the RPN's conv and the box head's MLP shrank too
        assert small.backbone.fpn.layer_blocks[0][0].out_channels == 128
        assert small.rpn.head.conv[0][0].in_channels == 128
        assert small.roi_heads.box_head.fc6.in_features == 128 * 7 * 7
    else:
        assert small.head.classification_head.module_list[0][1].out_channels == 6 * 3  # whole
        assert (
            small.head.classification_head.module_list[0][1].in_channels
            < model.head.classification_head.module_list[0][1].in_channels
        )
    del model, gm, small
    gc.collect()
