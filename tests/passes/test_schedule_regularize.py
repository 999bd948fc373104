"""Iterative schedule and sparse-training regularisers."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxslim
from fxslim.passes.regularize import GroupLasso, bn_scale_penalty, l1_penalty
from fxslim.passes.schedule import prune_iteratively
from fxslim.runtime.measure import count_macs


def test_iterative_schedule_calls_back_and_reaches_target():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    seen = []

    def cb(m, k):
        seen.append((k, count_macs(m, x)))

    small = prune_iteratively(model, x, steps=3, target_macs=0.4, callback=cb, ignore=["fc"])
    base = count_macs(model, x)
    fracs = [m / base for _, m in seen]
    assert [k for k, _ in seen] == [1, 2, 3]
    assert fracs == sorted(fracs, reverse=True)  # shrinks every step
    assert abs(fracs[0] - 0.8) <= 0.02 and abs(fracs[-1] - 0.4) <= 0.01
    assert count_macs(small, x) == seen[-1][1]


def test_penalties_hand_computed():
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
        model[1].weight.copy_(torch.tensor([0.5, -3.0]))
        model[2].weight.copy_(torch.tensor([[4.0, -1.0]]))
    assert l1_penalty(model).item() == pytest.approx(1 + 2 + 4 + 1)
    assert bn_scale_penalty(model).item() == pytest.approx(3.5)


def test_group_lasso_spans_coupled_members_and_has_gradients():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(1, 2, bias=False)
            self.b = nn.Linear(2, 1, bias=False)
            with torch.no_grad():
                self.a.weight.copy_(torch.tensor([[3.0], [0.0]]))
                self.b.weight.copy_(torch.tensor([[4.0, 2.0]]))

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    gm = fxslim.trace(M(), torch.ones(2, 1))
    lasso = GroupLasso(gm, fxslim.analyze(gm))
    val = lasso(gm)
    assert val.item() == pytest.approx((9 + 16) ** 0.5 + (0 + 4) ** 0.5)  # unit 0: a row 0 + b col 0
    val.backward()
    assert gm.a.weight.grad is not None and gm.b.weight.grad.abs().sum() > 0
