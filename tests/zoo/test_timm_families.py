"""The timm census (`bench.timm_table`, every family in bench/TIMM.md) in CI: one model
from each of a subset of families, through the census's own stages - trace equals the
model, `prune(0.5)` with the classifier ignored keeps fewer MACs, the slicing and
dead-channel oracles, a verified ONNX export of the pruned model.

The families are those whose code shapes the rule table had to learn beyond the ViT /
ConvNeXt / EfficientNet ones of test_timm_zoo.py: a per-head bias passed to SDPA as its
mask and a qkv bias built by ``torch.cat`` (BEiT), class attention on an expanded
parameter and talking heads (CaiT), gated positional attention (ConViT), two-branch cross attention
(CrossViT), channel attention (DaViT), rotary attention with a reshape to a size object
(EVA02), a resized position-embedding grid (SAM2-Hiera)
and block/grid attention (MaxViT-rw). Depth is cut where timm takes it (the same blocks,
fewer of them) to keep the file near two minutes on 2 cores. (CSATv2's constant index
list is covered by a unit test in tests/graph/test_rules.py; its model takes a minute.)
"""

from __future__ import annotations

import pytest

pytest.importorskip("timm")

from bench.timm_table import STAGES, run_one

# family: (model, create_model overrides, MACs share kept at most)
FAMILIES = {
    "beit": ("beit_base_patch16_224", {"depth": 2}, 0.40),
    "cait": ("cait_xxs24_224", {"depth": 2, "depth_token_only": 1}, 0.40),
    "convit": ("convit_tiny", {"depth": 3, "local_up_to_layer": 2}, 0.40),
    "crossvit": ("crossvit_tiny_240", {}, 0.40),
    "davit": ("davit_tiny", {"depths": (1, 1, 1, 1)}, 0.40),
    "eva": ("eva02_tiny_patch14_224", {"depth": 2}, 0.65),  # rotary attention
    "hiera": ("sam2_hiera_tiny", {}, 0.40),
    "maxxvit": ("maxvit_pico_rw_256", {"depths": (1, 1, 1, 1)}, 0.40),
}
# families whose pruned model must come back in the user's own classes (a class sync each)
OWN_CLASSES = {"beit", "cait", "convit"}


@pytest.mark.zoo
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_through_the_census_stages(family):
    name, overrides, max_kept = FAMILIES[family]
    row = run_one(name, **overrides)
    assert {s: row.get(s) for s in STAGES} == dict.fromkeys(STAGES, "ok"), row
    assert row["macs_kept"] <= max_kept, row
    if family in OWN_CLASSES:
        assert row["form"] == "class", row
