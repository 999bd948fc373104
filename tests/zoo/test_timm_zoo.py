"""timm backbones and torchvision video networks through both oracles and prune(ratio=0.5).

These models reach layers through their function forms: timm's fused norm+act layers
(``BatchNormAct2d`` calls ``F.batch_norm``, ``GroupNorm1`` calls ``F.group_norm``) and
torchvision's video ResNets (``Conv3DSimple`` subclasses ``nn.Conv3d``, so fx traces into
it and meets ``F.conv3d``). Each model: tracing changes nothing; the dead-channel oracle
on random channels of every statistic-free group; at ratio 0.5 with the classifier head
ignored, the slicing oracle, every module's size attributes agree with its parameters,
and the MACs kept (counted by torch's flop counter) are at most 40%, or the test says
which part stays whole and why. Batch 1 and small inputs keep the file near two minutes
on 2 quiet cores (s3d, which needs 14 frames of 209 x 209, takes a quarter of it).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from torch import nn

import fxslim
from fxslim.passes.policy import uniform_removal
from fxslim.passes.prune import apply_plan, make_plan
from fxslim.passes.verify import dead_channel_check, max_scaled_diff, slicing_mismatches
from fxslim.runtime.measure import FlopCounter, no_mha_fastpath
from tests.zoo.zoo import _attributes_agree, _randomise_norms, random_removal

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

RTOL, ATOL = 1e-4, 1e-5


def _mobilevit_blocks(model: nn.Module) -> list[str]:
    from timm.models.mobilevit import MobileVitBlock

    return [n for n, m in model.named_modules() if isinstance(m, MobileVitBlock)]


# name -> (library, input shape, MACs share kept at most, leaf paths, pinned groups at most
# apart from those that touch a leaf)
MODELS = {
    "efficientnet_b0": ("timm", (1, 3, 64, 64), 0.40, None, 2),
    "regnety_002": ("timm", (1, 3, 64, 64), 0.40, None, 2),
    "rexnet_100": ("timm", (1, 3, 64, 64), 0.40, None, 2),
    "ghostnet_100": ("timm", (1, 3, 64, 64), 0.40, None, 2),
    "poolformer_s12": ("timm", (1, 3, 64, 64), 0.40, None, 2),
    "convnext_atto": ("timm", (1, 3, 64, 64), 0.40, None, 2),
    # The MobileViT blocks stay whole: their forward branches on the feature map's size
    # (`if new_h != H`), which symbolic tracing cannot follow, so they are leaf modules
    # and the channels entering and leaving them are pinned (a capture that runs the model
    # is issue 11 item 3). The MobileNetV2 stages around them prune.
    "mobilevit_xxs": ("timm", (1, 3, 64, 64), 1.0, _mobilevit_blocks, 2),
    # ViTs at 64 px (timm resamples the position embedding at creation): attention by
    # whole heads (fused qkv, reshape(B, N, 3, H, D), permute, unbind, SDPA)
    "deit_tiny_patch16_224": ("timm", (1, 3, 64, 64), 0.40, None, 4),
    "vit_tiny_patch16_224": ("timm", (1, 3, 64, 64), 0.40, None, 4),
    # Swin at 64 px: windows clamped to the small stages, padded and sliced back; heads
    # whole across the shifted windows and the relative-position bias table
    "swin_tiny_patch4_window7_224": ("timm", (1, 3, 64, 64), 0.40, None, 2),
    "r3d_18": ("video", (1, 3, 4, 32, 32), 0.40, None, 2),
    "mc3_18": ("video", (1, 3, 4, 32, 32), 0.40, None, 2),
    # s3d's final AvgPool3d((2, 7, 7)) needs at least 14 frames of 209 x 209
    "s3d": ("video", (1, 3, 14, 209, 209), 0.40, None, 2),
}


def build(name: str):
    lib, shape, _, leaves, _ = MODELS[name]
    torch.manual_seed(0)
    if lib == "timm":
        kw = {"img_size": shape[-1]} if "_224" in name else {}
        model = timm.create_model(name, pretrained=False, **kw).eval()
        head = model.pretrained_cfg["classifier"]
    else:
        model = torchvision.models.get_model(name).eval()
        head = "classifier.1" if name == "s3d" else "fc"
    _randomise_norms(model, 0)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return model, x, head, (leaves(model) if leaves else [])


def _run_counting(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The output and the MACs of one forward (`fxslim.count_macs`'s count, one run)."""
    with FlopCounter() as counter, torch.inference_mode(), no_mha_fastpath():
        out = model(x)
    return out, counter.get_total_flops() // 2


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(MODELS))
def test_function_form_model(name):
    torch.set_num_threads(2)
    model, x, head, leaves = build(name)
    max_macs, max_pinned = MODELS[name][2], MODELS[name][4]
    gm = fxslim.trace(model, x, leaf_paths=leaves, share_weights=True)
    cg = fxslim.analyze(gm)
    ref, macs0 = _run_counting(model, x)
    with torch.inference_mode():
        assert max_scaled_diff(ref, gm(x)) == 0.0  # tracing itself changes nothing
    assert ref.abs().max() > 0
    # pinned: the model input and output only (and what touches a leaf kept whole)
    pinned = [g for g in cg.groups if not g.prunable and not any(f"'{p}'" in g.reason for p in leaves)]
    assert len(pinned) <= max_pinned, [str(g) for g in pinned]

    # oracle 2 (dead channels) on every stat-free prunable group at once, random channels
    removal = random_removal(cg, np.random.default_rng(0))
    assert removal, "no statistic-free group to check"
    diff, pruned, plan = dead_channel_check(gm, cg, removal, x)
    assert diff <= RTOL + ATOL, f"dead-channel equivalence broken: {diff:.3e}"
    assert slicing_mismatches(gm, pruned, plan) == []  # oracle 1
    del pruned

    # ratio 0.5, classifier head whole: oracle 1 covers the statistic groups too
    removal = uniform_removal(gm, cg, 0.5, [head])
    plan = make_plan(cg, removal)
    small = apply_plan(gm, cg, plan, x)
    small.graph.lint()
    assert slicing_mismatches(gm, small, plan) == []
    assert _attributes_agree(small) == []
    out, macs1 = _run_counting(small, x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    kept = macs1 / macs0
    assert kept <= max_macs, f"{name} keeps {kept:.1%} of its MACs"
    del model, gm, small
    gc.collect()


def test_function_forms_leave_user_model_and_prune_via_public_api():
    """fxslim.prune on a timm model: the user's model is untouched, the result prunes again."""
    model, x, head, _ = build("regnety_002")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fxslim.prune(model, x, ratio=0.5, ignore=[head])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # stem.bn is a BatchNormAct2d that fx traced through: the GraphModule keeps its
    # tensors (read by F.batch_norm) on a bare module, all sliced to the conv's channels
    bn = small.get_submodule("stem.bn")
    assert small.get_submodule("stem.conv").out_channels == 16
    assert [tuple(getattr(bn, k).shape) for k in ("weight", "bias", "running_mean", "running_var")] == [(16,)] * 4
    again = fxslim.prune(small, x, ratio=0.5, ignore=[head])
    with torch.inference_mode():
        assert again(x).shape == (1, 1000)
    assert again.get_submodule("stem.bn").running_var.shape == (8,)


@pytest.mark.parametrize("name, attn", [("deit_tiny_patch16_224", "blocks.0.attn"),
                                        ("swin_tiny_patch4_window7_224", "layers.0.blocks.0.attn")])
def test_timm_attention_keeps_its_classes_with_fewer_heads(name, attn):
    """prune's class-keeping default on timm attention: the head count follows the pruned qkv
    (deit_tiny's 3 heads keep 2 at ratio 0.5), outputs equal the pruned graph's."""
    model, x, head, _ = build(name)
    gm = fxslim.prune(model, x, ratio=0.5, ignore=[head], keep_classes=False)
    small = fxslim.prune(model, x, ratio=0.5, ignore=[head])
    assert type(small) is type(model), fxslim.utils.fxslim_meta(gm).get("fxslim_form_reason")
    before, after = model.get_submodule(attn), small.get_submodule(attn)
    head_dim = before.qkv.weight.shape[0] // (3 * before.num_heads)  # heads go whole: head_dim stays
    assert type(after) is type(before) and 0 < after.num_heads < before.num_heads
    assert after.qkv.weight.shape[0] == 3 * after.num_heads * head_dim
    with torch.inference_mode():
        torch.testing.assert_close(small(x), gm(x), rtol=RTOL, atol=ATOL)


def test_timm_rope_attention_keeps_its_class():
    """timm's AttentionRope (DeepSeek-ViT, EVA-style): the head counts follow the pruned projections."""
    from timm.layers.attention import AttentionRope

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(16, 64), AttentionRope(64, num_heads=4), nn.Linear(64, 5)

        def forward(self, x):
            return self.out(self.attn(self.inp(x)))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 7, 16)
    gm = fxslim.prune(model, x, 0.5, keep_classes=False)
    small = fxslim.prune(model, x, 0.5)
    assert type(small) is Net and small.attn.num_heads == small.attn.num_kv_heads == 2
    assert small.attn.attn_dim == 2 * small.attn.head_dim == small.attn.proj.in_features
    with torch.inference_mode():
        torch.testing.assert_close(small(x), gm(x), rtol=RTOL, atol=ATOL)
