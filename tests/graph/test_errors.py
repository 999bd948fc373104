"""Failures inside fxslim are typed and point at the op: the crashes of issue 11, item 4.

* timm's Swin slices its windows back with bounds read from a shape (``x[:, :H, :W]``):
  the slice rewrite called ``slice.indices`` on graph nodes (``TypeError: slice indices
  must be integers``). A computed bound now keeps that dim whole, the others prune.
* A leaf that returns a ``ModelOutput`` (an HF Whisper encoder kept whole): the tensor read
  out of it had no channel spaces and the next rule subscripted None (``TypeError:
  'NoneType' object is not subscriptable``). Such a tensor now gets pinned spaces whose
  reason names the reading node.
* Any rule that still fails raises `RuleError` naming the op, the module path and the node.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.runtime.measure import count_macs
from tests.helpers import check_oracles

RTOL, ATOL = 1e-4, 1e-5


class WindowUnpad(nn.Module):
    """Swin's window padding: pad H, W up to the window, work, slice back with H, W from x.shape."""

    def __init__(self, window: int = 4):
        super().__init__()
        self.window = window
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # B, H, W, C
        _, h, w, _ = x.shape
        ph, pw = (self.window - h % self.window) % self.window, (self.window - w % self.window) % self.window
        y = F.pad(x, (0, 0, 0, pw, 0, ph))
        y = torch.roll(y, shifts=(-1, -1), dims=(1, 2))  # a shifted window
        y = self.fc2(F.gelu(self.fc1(y)))
        y = torch.roll(y, shifts=(1, 1), dims=(1, 2))[:, :h, :w, :].contiguous()
        return self.head((x + y).permute(0, 3, 1, 2))


def test_slice_with_computed_bounds_prunes_the_other_dims():
    model = WindowUnpad().eval()
    x = torch.randn(2, 3, 10, 10)  # 10 is no multiple of the window: the slice is real
    _gm, cg, _pruned = check_oracles(model, x, expect_prunable=2)
    assert cg.group_of("stem.weight", 0).prunable and cg.group_of("fc1.weight", 0).prunable
    small = fxslim.prune(model, x, 0.5, ignore=["head"])
    assert small.stem.out_channels == 8 and small.fc1.out_features == 16
    with torch.inference_mode():
        torch.testing.assert_close(small(torch.randn(1, 3, 9, 7)).shape, torch.Size([1, 4, 9, 7]))
    spatial = [g for g in fxslim.analyze(fxslim.trace(model, x)).builder.pins.values() if "computed bound" in g]
    assert spatial and "'getitem' at '<top level>'" in spatial[0]


def test_timm_swin_prunes_where_it_crashed():
    """The reported call: timm swin_tiny, prune(ratio=0.5, ignore=['head']); here at 64 px
    (timm clamps the windows to the smaller stages, so the padding slice is real).
    Its attention heads stay whole (qkv reshape/unbind: issue 11 item 2)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    small = fxslim.prune(model, x, ratio=0.5, ignore=["head"])
    with torch.inference_mode():
        assert small(x).shape == (1, 1000)
    assert small.get_submodule("layers.0.blocks.0.mlp.fc1").out_features == 192  # 384 -> 192
    assert count_macs(small, x) / count_macs(model, x) < 0.6


def test_tensor_read_out_of_a_leaf_model_output_is_pinned_not_a_crash():
    transformers = pytest.importorskip("transformers")
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                     encoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16)
    torch.manual_seed(0)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Conv1d(8, 8, 1)
            self.enc = WhisperEncoder(cfg)
            self.fc1, self.fc2 = nn.Linear(32, 24), nn.Linear(24, 5)

        def forward(self, x):
            h = self.enc(self.pre(x))[0]  # a BaseModelOutput, read by position
            return self.fc2(F.relu(self.fc1(h)))

    model = Wrapped().eval()
    x = torch.randn(1, 8, 32)
    with pytest.raises(fxslim.TraceError, match="WhisperEncoder.forward") as err:
        fxslim.trace(model.enc, x, capture="fx")  # its own forward: not "mark '<top level>' as a leaf"
    assert "<top level>" not in str(err.value)
    gm = fxslim.trace(model, x, leaf_paths=["enc"])
    cg = fxslim.analyze(gm)
    g_in = cg.group_of("fc1.weight", 1)
    assert not g_in.prunable and "cannot follow" in g_in.reason and "getitem" in g_in.reason
    assert cg.group_of("fc1.weight", 0).prunable
    small = fxslim.prune(model, x, 0.5, leaf_paths=["enc"])
    assert small.fc1.out_features == 12
    with torch.inference_mode():
        torch.testing.assert_close(small(x).shape, torch.Size([1, 16, 5]))


def test_a_failing_rule_raises_rule_error_naming_op_and_path():
    class Odd(nn.Module):
        def forward(self, x):
            return x * 2

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.odd, self.b = nn.Conv2d(3, 8, 1), Odd(), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.odd(self.a(x)))

    def broken(b, node, mod, path):
        raise KeyError("oops")

    from fxslim.graph.rules import RULES

    gm = fxslim.trace(M(), torch.randn(1, 3, 4, 4), leaf_modules=[Odd])
    fxslim.register_rule(Odd, broken)
    try:
        with pytest.raises(fxslim.RuleError, match=r"rule for Odd at 'odd' failed \(KeyError") as err:
            fxslim.analyze(gm)
        assert isinstance(err.value, fxslim.FxslimError) and "node:" in str(err.value)
    finally:
        del RULES[Odd]
