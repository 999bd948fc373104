"""Equivalent transformations: BatchNorm folding, identity dropping, Linear fusion.

Every rewrite: `modified` both ways, the graph lints, outputs allclose (explicit rtol/atol)
on seeded inputs, and a structural fact (no BatchNorm left, fewer Linear layers)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxslim
from fxslim.passes.base import PassManager
from fxslim.passes.drop_identity import DropIdentitiesPass
from fxslim.passes.fold_bn import FoldBatchNormPass, fold_batchnorm
from fxslim.passes.fuse_linear import FuseLinearPass
from tests.graph.test_random_nets import RandomNet

RTOL, ATOL = 1e-4, 1e-5
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def random_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affines (a fresh BN is the identity in eval)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if m.affine:
                    m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def batchnorms(gm) -> int:
    return sum(isinstance(m, _BN) for m in gm.modules())


def assert_same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        want, got = a(x), b(x)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL * float(want.abs().max()))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fold_torchvision(name):
    torch.manual_seed(0)
    model = random_stats(getattr(torchvision.models, name)())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gm = fxslim.trace(model, x)
    res = FoldBatchNormPass()(gm)
    assert res.modified and res.info["batchnorms_before"] == batchnorms(gm) > 0
    assert res.info["batchnorms_after"] == batchnorms(res.module) == 0
    res.module.graph.lint()
    assert_same(model, res.module, x)
    assert batchnorms(gm) == res.info["batchnorms_before"]  # the input is left as it was
    again = FoldBatchNormPass()(res.module)
    assert not again.modified and again.module is res.module


@settings(max_examples=8, deadline=None)
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_fold_random_nets(seed):
    print(f"random net seed={seed}")
    torch.manual_seed(seed)
    model = random_stats(RandomNet(seed), seed)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    res = PassManager([DropIdentitiesPass(), FoldBatchNormPass(), FuseLinearPass()])(
        fxslim.trace(model, x)
    )
    assert res.modified
    assert batchnorms(res.module) == 0  # every BN follows a conv called once
    res.module.graph.lint()
    assert_same(model, res.module, x)


class Mixed(nn.Module):
    """BN before a Linear, Linear before BN1d, a padded conv after a BN (not foldable),
    a BN1d over (N, L, C) after a Linear (normalises L: not foldable), dropout, identity."""

    def __init__(self):
        super().__init__()
        self.bn0, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)
        self.bn_in, self.fc1, self.bn1 = nn.BatchNorm1d(64), nn.Linear(64, 16), nn.BatchNorm1d(16)
        self.drop, self.keep = nn.Dropout(0.5), nn.Identity()
        self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 10)
        self.seq, self.bn_seq = nn.Linear(8, 5), nn.BatchNorm1d(4)

    def forward(self, x):
        y = torch.flatten(self.conv(torch.relu(self.bn0(x))), 1)
        y = self.keep(self.bn1(self.fc1(self.bn_in(y))))
        out = self.fc3(self.fc2(self.drop(torch.relu(y))))
        return out, self.bn_seq(self.seq(x.reshape(x.shape[0], 4, -1)[..., :8]))


@pytest.fixture
def mixed():
    torch.manual_seed(0)
    return random_stats(Mixed()), torch.randn(
        3, 3, 4, 4, generator=torch.Generator().manual_seed(2)
    )


def test_fold_both_directions_and_refusals(mixed):
    model, x = mixed
    res = FoldBatchNormPass()(fxslim.trace(model, x))
    assert res.modified
    # bn_in reads a flatten: folded forward into fc1; bn1 then folds back into that fc1
    assert res.info["folded"] == [["fc1", "bn_in"], ["fc1", "bn1"]]
    kept = {n for n, m in res.module.named_modules() if isinstance(m, _BN)}
    assert kept == {"bn0", "bn_seq"}  # padded conv after bn0; BN1d over L after seq
    for a, b in zip(model(x), res.module(x)):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_drop_identities_and_fuse(mixed):
    model, x = mixed
    gm = fxslim.trace(model, x)
    dropped = DropIdentitiesPass()(gm)
    assert dropped.modified and {"drop", "keep"} <= set(dropped.info["dropped"])
    assert not any(isinstance(m, (nn.Dropout, nn.Identity)) for m in dropped.module.modules())
    assert not DropIdentitiesPass()(dropped.module).modified
    # fc2 (16->32) -> fc3 (32->10): 160 MACs fused against 832
    fused = FuseLinearPass()(dropped.module)
    assert fused.modified and fused.info["fused"] == [["fc2", "fc3"]]
    assert fused.info["linears_after"] == fused.info["linears_before"] - 1
    assert tuple(fused.module.get_submodule("fc3").weight.shape) == (10, 16)
    assert not FuseLinearPass()(fused.module).modified
    fused.module.graph.lint()
    for a, b in zip(model(x), fused.module(x)):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


def test_fuse_leaves_a_bottleneck():
    model = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64)).eval()  # 512 MACs, fused 4096
    x = torch.randn(2, 64)
    gm = fxslim.trace(model, x)
    assert not FuseLinearPass()(gm).modified
    forced = FuseLinearPass(force=True)(gm)
    assert forced.modified and forced.info["linears_after"] == 1
    torch.testing.assert_close(forced.module(x), model(x), rtol=RTOL, atol=ATOL)


def test_pruned_then_folded_round_trip(tmp_path):
    torch.manual_seed(0)
    model = random_stats(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    small = fxslim.prune(model, x, 0.5, ignore=["fc"])
    folded = fold_batchnorm(small, x)
    assert batchnorms(folded) == 0
    assert_same(small, folded, x)
    fxslim.save(folded, tmp_path / "m")
    again = fxslim.load(tmp_path / "m", model=torchvision.models.resnet18())
    assert batchnorms(again) == 0
    with torch.inference_mode():
        assert torch.equal(again(x), folded(x))


def test_training_mode_batchnorm_is_left(mixed):
    model, x = mixed
    gm = fxslim.trace(model, x).train()  # training BatchNorm normalises by batch statistics
    res = FoldBatchNormPass()(gm)
    assert not res.modified and res.module is gm and batchnorms(gm) == 4
