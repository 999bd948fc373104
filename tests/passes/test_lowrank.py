"""Low-rank factorisation: exact at full rank; at lower rank the weight error is the
discarded singular values (Eckart-Young); ranks by energy and params target; save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim
from fxslim.errors import ArgumentError
from fxslim.passes.lowrank import LowRankPass, factorize, singular_values

RTOL, ATOL = 1e-4, 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, stride=2, padding=1, dilation=1)
        self.conv2 = nn.Conv2d(24, 32, 3, padding=2, dilation=2, bias=False)
        self.fc1, self.fc2 = nn.Linear(32 * 16, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def product(pair: nn.Sequential) -> torch.Tensor:
    """The (out, in*k...) matrix the pair computes: second (out, r) @ first (r, in*k...)."""
    first, second = pair
    return second.weight.detach().double().flatten(1) @ first.weight.detach().double().flatten(1)


def test_full_rank_reproduces_the_model(net):
    model, x = net
    gm = fxslim.trace(model, x)
    full = {k: min(m.weight.flatten(1).shape) for k, m in model.named_children()}
    res = LowRankPass(ranks=full)(gm)
    assert res.modified and res.info["ranks"] == full == res.info["full_ranks"]
    assert all(d < 1e-6 for d in res.info["discarded"].values())
    res.module.graph.lint()
    first, second = res.module.get_submodule("conv")
    assert (first.stride, first.padding, second.kernel_size) == ((2, 2), (1, 1), (1, 1))
    assert res.module.get_submodule("conv2")[0].dilation == (2, 2)
    torch.testing.assert_close(res.module(x), model(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("layer,rank", [("fc1", 7), ("conv2", 5), ("conv", 3)])
def test_error_is_the_discarded_singular_values(net, layer, rank):
    model, _ = net
    m = getattr(model, layer)
    s = singular_values(m)
    pair = factorize(m, rank)
    err = torch.linalg.matrix_norm(m.weight.detach().double().flatten(1) - product(pair))
    want = (s[rank:] ** 2).sum().sqrt()
    assert torch.isclose(err, want, rtol=1e-5, atol=1e-6), (float(err), float(want))
    assert pair[0].weight.shape[0] == pair[1].weight.shape[1] == rank


def test_energy_and_params_target(net):
    model, x = net
    gm = fxslim.trace(model, x)
    before = sum(p.numel() for p in model.parameters())
    res = LowRankPass(target_params=0.5)(gm)
    assert res.modified and res.info["params_after"] == sum(
        p.numel() for p in res.module.parameters()
    )
    assert res.info["params_after"] <= 0.5 * before < res.info["params_before"]
    for k, r in res.info["ranks"].items():  # every factorised layer got smaller
        out, inn = getattr(model, k).weight.flatten(1).shape
        assert r * (out + inn) < out * inn
    kept = LowRankPass(energy=0.9, layers=["fc1"])(gm)
    s = singular_values(model.fc1)
    r = kept.info["ranks"]["fc1"]
    share = (s[:r] ** 2).sum() / (s**2).sum()
    assert share >= 0.9 > (s[: r - 1] ** 2).sum() / (s**2).sum()
    # full energy means full rank, which saves nothing: no layer changes
    none = LowRankPass(energy=1.0)(gm)
    assert not none.modified and none.module is gm
    with pytest.raises(ArgumentError):
        LowRankPass(energy=0.9, rank_ratio=0.5)
    with pytest.raises(ArgumentError):
        LowRankPass(ranks={"nope": 2})(gm)


def test_round_trip_after_prune(net, tmp_path):
    model, x = net
    small = fxslim.prune(model, x, 0.25, ignore=["fc2"], keep_classes=False)
    low = LowRankPass(rank_ratio=0.5, layers=["fc1", "conv2"])(small).module
    fxslim.save(low, tmp_path / "m")
    again = fxslim.load(tmp_path / "m", model=Net())
    assert tuple(again.get_submodule("fc1")[0].weight.shape) == tuple(
        low.get_submodule("fc1")[0].weight.shape
    )
    with torch.inference_mode():
        assert torch.equal(again(x), low(x))
