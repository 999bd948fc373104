"""Constant folding: parameter-only subgraphs become buffers, outputs unchanged.

Every rewrite: `modified` both ways, the graph lints, outputs allclose on seeded inputs,
and a structural fact (which nodes were folded, which tensors left the model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.errors import ArgumentError
from fxslim.passes.fold_constants import FoldConstantsPass, fold_constants

RTOL, ATOL = 1e-5, 1e-6


class Biased(nn.Module):
    """A BEiT-style assembled bias, a weight scaled in the forward and a Swin-style
    relative-position bias gathered from its table by a fixed index."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q_bias = nn.Parameter(torch.randn(8, generator=g))
        self.v_bias = nn.Parameter(torch.randn(8, generator=g))
        self.w = nn.Parameter(torch.randn(24, 6, generator=g))
        self.table = nn.Parameter(torch.randn(7, 2, generator=g))
        self.register_buffer("index", torch.randint(0, 7, (4, 4), generator=g))
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        y = F.linear(self.proj(x), self.w * 0.5, bias)
        rel = self.table[self.index.view(-1)].view(4, 4, 2).permute(2, 0, 1)
        return y[:, :16].reshape(-1, 1, 4, 4) + rel


def _ops(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def test_folds_parameter_only_subgraphs():
    model = Biased().eval()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    gm = fxslim.trace(model, x)
    res = FoldConstantsPass()(gm)
    assert res.modified
    res.module.graph.lint()
    with torch.inference_mode():
        torch.testing.assert_close(res.module(x), model(x), rtol=RTOL, atol=ATOL)
    # the three exits are stored, everything upstream of them is gone
    assert res.info["folded"] == ["cat", "mul", "permute"]
    # (the trace computed ``index.view(-1)`` into a tensor constant already)
    assert sorted(res.info["removed_tensors"]) == ["_tensor_constant0", "q_bias", "table", "v_bias", "w"]
    assert res.info["ops_before"] == len(_ops(gm)) == 11
    assert res.info["ops_after"] == len(_ops(res.module)) == 5  # proj, linear, getitem, reshape, add
    names = dict(res.module.named_buffers())
    torch.testing.assert_close(names["folded_mul"], model.w.detach() * 0.5)
    assert "q_bias" in dict(model.named_parameters())  # the user's model keeps its tensors
    again = FoldConstantsPass()(res.module)
    assert not again.modified and again.module is res.module


def test_training_mode_keeps_parameters_trainable():
    model = Biased().train()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    gm = fxslim.trace(model, x)
    res = FoldConstantsPass()(gm)
    # every constant subgraph here reads a parameter: in training mode none folds
    assert not res.modified and res.module is gm and res.info["folded"] == []
    gm.eval()
    assert FoldConstantsPass()(gm).info["folded"] == ["cat", "mul", "permute"]


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * (self.w + torch.rand_like(self.w)) + self.w.exp()


def test_random_ops_are_not_folded():
    x = torch.randn(2, 4)
    res = FoldConstantsPass()(fxslim.trace(Noisy().eval(), x))
    assert res.info["folded"] == ["exp"]  # w.exp() folds; w + rand_like(w) stays random
    targets = [n.target for n in res.module.graph.nodes if n.op == "call_function"]
    assert torch.rand_like in targets
    torch.manual_seed(3)
    a = res.module(x)
    torch.manual_seed(3)
    b = Noisy().eval()(x)
    torch.testing.assert_close(a, b)


def test_max_elements_leaves_a_large_constant():
    class Expand(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 8))

        def forward(self, x):
            return x + self.w.expand(64, 8).tanh()

    x = torch.randn(64, 8)
    gm = fxslim.trace(Expand().eval(), x)
    assert not FoldConstantsPass(max_elements=256)(gm).modified
    res = FoldConstantsPass(max_elements=512)(gm)
    assert res.modified and res.info["folded"] == ["tanh"]


def test_timm_swin_relative_position_bias_and_round_trip(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1, 1, 1), num_classes=10
    ).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    small = fxslim.prune(model, x, ratio=0.5, ignore=["head.fc"])
    res = FoldConstantsPass()(fxslim.trace(small, x))
    assert res.modified
    # one relative-position bias per block (four blocks), gathered from its table no more
    assert len(res.info["folded"]) == 4 and res.info["ops_after"] < res.info["ops_before"]
    assert sum(n.endswith("relative_position_bias_table") for n in res.info["removed_tensors"]) == 4
    with torch.inference_mode():
        torch.testing.assert_close(res.module(x), small(x), rtol=1e-4, atol=1e-5)
    fxslim.save(res.module, tmp_path / "m")
    back = fxslim.load(tmp_path / "m", model=model)
    with torch.inference_mode():
        # load replays prune and fold on a fresh trace (the same ops, not the same graph)
        torch.testing.assert_close(back(x), res.module(x), rtol=1e-5, atol=1e-6)
    assert [n for n, _ in back.named_buffers() if n.startswith("folded_")] == [
        f"folded_{n}" for n in res.info["folded"]
    ]
    assert fold_constants(model, x).meta["fxslim_history"][-1]["pass"] == "fold_constants"


def test_bad_requests_are_typed():
    with pytest.raises(ArgumentError, match="max_elements must be a positive int"):
        FoldConstantsPass(max_elements=0)
    with pytest.raises(ArgumentError, match="model must be a torch.nn.Module"):
        fold_constants("model", torch.randn(1, 6))
