"""Pruning policy: criteria on hand-computed examples, allocation rules, targets, dry runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fxslim
from fxslim.passes import importance as I
from fxslim.passes.policy import Policy, allocate, score_groups
from fxslim.runtime.measure import count_macs, count_params


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(1, 5, bias=False)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(5, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]]))
            self.fc2.weight.fill_(1.0)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def analysed(model, x):
    gm = fxslim.trace(model.eval(), x)
    return gm, fxslim.analyze(gm)


def test_l1_l2_normalised_by_sum():
    gm, cg = analysed(TwoLinear(), torch.ones(2, 1))
    g = cg.group_of("fc1.weight", 0)
    l1 = I.MagnitudeImportance(p=1, normalize="sum")(gm, g)
    np.testing.assert_allclose(l1, np.array([1, 2, 3, 4, 5]) / 15 + 0.2)  # fc1 rows + fc2 columns
    l2 = I.MagnitudeImportance(p=2, normalize="sum")(gm, g)
    np.testing.assert_allclose(l2, np.array([1, 4, 9, 16, 25]) / 55 + 0.2)
    mx = I.MagnitudeImportance(p=1, normalize=None, member_reduction="max")(gm, g)
    np.testing.assert_allclose(mx, [1, 2, 3, 4, 5])


def test_lamp_hand_computed():
    gm, cg = analysed(TwoLinear(), torch.ones(2, 1))
    g = cg.group_of("fc1.weight", 0)
    lamp = I.LAMPImportance(normalize=None)
    lamp.roles = ("out",)
    sq = np.array([1, 4, 9, 16, 25.0])
    want = [sq[i] / sq[i:].sum() for i in range(5)]
    np.testing.assert_allclose(lamp(gm, g), want)


def test_bn_scale():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    gm, cg = analysed(model, torch.randn(1, 3, 4, 4))
    g = cg.group_of("0.weight", 0)
    np.testing.assert_allclose(I.BNScaleImportance(normalize=None)(gm, g), [0.5, 2.0, 1.0])


def test_activation_mean_and_apoz_on_known_pattern():
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]))
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])  # unit 0: relu(1), relu(-1); unit 1: 0, 1; unit 2: 2, 2
    gm, cg = analysed(model, x)
    g = cg.group_of("0.weight", 0)
    data = [(x, torch.zeros(2, dtype=torch.long))]
    np.testing.assert_allclose(I.ActivationImportance(data, cg, "mean")(gm, g), [0.5, 0.5, 2.0])
    np.testing.assert_allclose(I.ActivationImportance(data, cg, "apoz")(gm, g), [0.5, 0.5, 1.0])


def test_taylor_hand_computed():
    gm, cg = analysed(TwoLinear(), torch.ones(2, 1))
    g = cg.group_of("fc1.weight", 0)
    x, y = torch.ones(1, 1), torch.zeros(1, 1)
    crit = I.TaylorImportance([(x, y)], loss_fn=lambda out, t: ((out - t) ** 2).sum(), normalize=None)
    crit.roles = ("out",)
    # out = sum_i w_i (all relu-positive); dL/dw_i = 2 * out * x = 30; score_i = |w_i * 30|
    np.testing.assert_allclose(crit(gm, g), 30 * np.arange(1, 6))


def test_sensitivity_and_random():
    gm, cg = analysed(TwoLinear(), torch.ones(2, 1))
    g = cg.group_of("fc1.weight", 0)
    x, y = torch.ones(4, 1), torch.zeros(4, 1)
    sens = I.SensitivityImportance([(x, y)], loss_fn=lambda o, t: ((o - t) ** 2).mean())(gm, g)
    # removing unit i drops w_i from out = 15: loss (15 - w_i)^2 - 15^2
    np.testing.assert_allclose(sens, [(15 - w) ** 2 - 225 for w in range(1, 6)])
    assert torch.equal(gm.fc1.weight, TwoLinear().fc1.weight)  # restored
    r1, r2 = I.RandomImportance(3)(gm, g), I.RandomImportance(3)(gm, g)
    np.testing.assert_array_equal(r1, r2)


class Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            for m in (self.a, self.b):
                m.weight.fill_(1.0)
                m.bias.zero_()
            self.a.weight[2] = 1e-3  # channel 2 is tiny in a ...
            self.b.weight[2] = 50.0  # ... and large in b
            self.b.weight[0] = 1e-3
            self.out.weight.fill_(1.0)

    def forward(self, x):
        return self.out(self.a(x) + self.b(x))


def test_criterion_sees_coupled_members():
    model = Res()
    small = fxslim.prune(model, torch.randn(1, 3, 4, 4), 0.25)
    # one unit goes: channel 2 survives in both a and b because b needs it
    assert small.a.out_channels == 3 and small.b.out_channels == 3
    assert torch.equal(small.b.weight, model.b.weight[[1, 2, 3]])
    assert torch.equal(small.a.weight, model.a.weight[[1, 2, 3]])


def test_magnitudes_small_and_blocked_paths_agree(monkeypatch):
    torch.manual_seed(0)
    for shape in [(7,), (6, 5), (8, 3, 3, 3), (4, 2, 5)]:
        t = torch.randn(shape)
        for p in (1, 2):
            want = {0: t.abs().pow(p).reshape(shape[0], -1).sum(1)}
            if t.dim() > 1:
                want[1] = t.abs().pow(p).transpose(0, 1).reshape(shape[1], -1).sum(1)
            small = I._magnitudes(t, p)
            monkeypatch.setattr(I, "_NUMPY_REDUCE_MAX", 0)  # force the chunked torch path
            big = I._magnitudes(t, p)
            monkeypatch.undo()
            for d, w in want.items():
                np.testing.assert_allclose(small[d], w.double().numpy(), rtol=1e-5)
                np.testing.assert_allclose(big[d], w.double().numpy(), rtol=1e-5)


def test_prune_leaves_model_alone_and_shares_no_tensor():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fxslim.prune(model, torch.randn(1, 3, 32, 32), 0.5, ignore=["fc"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    theirs = {t.untyped_storage().data_ptr() for t in after.values()}
    assert not any(t.untyped_storage().data_ptr() in theirs for t in small.state_dict().values())
    assert small.fc.weight.shape == (1000, 256) and model.fc.weight.shape == (1000, 512)


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    gm = fxslim.trace(model, x, share_weights=True)
    return model, x, gm, fxslim.analyze(gm)


def test_round_to_keeps_multiples(r18):
    _model, _x, gm, cg = r18
    scores = score_groups(gm, cg, I.l1_importance, ["fc"])
    removal = allocate(cg, scores, Policy(ratio=0.37, round_to=8))
    for gid, s in scores.items():
        kept = len(s) - len(removal.get(gid, []))
        assert kept % 8 == 0 and kept > 0, (gid, len(s), kept)


def test_global_ranking_respects_max_ratio(r18):
    _model, _x, gm, cg = r18
    scores = score_groups(gm, cg, I.l1_importance, ["fc"])
    removal = allocate(cg, scores, Policy(ratio=0.6, global_ranking=True, max_ratio=0.7))
    total = sum(len(s) for s in scores.values())
    assert sum(len(u) for u in removal.values()) == int(0.6 * total)
    assert all(len(u) <= int(0.7 * len(scores[g])) for g, u in removal.items())
    uneven = {len(u) / len(scores[g]) for g, u in removal.items()}
    assert len(uneven) > 1  # global ranking does not prune uniformly


def test_threshold_and_overrides(r18):
    _model, _x, gm, cg = r18
    scores = score_groups(gm, cg, I.l1_importance, ["fc"])
    removal = allocate(cg, scores, Policy(threshold=0.9))
    for gid, s in scores.items():
        norm = s / np.abs(s).mean()
        assert len(removal.get(gid, [])) == min((norm < 0.9).sum(), len(s) - 1)
    grp = cg.group_of("layer1.0.conv1.weight", 0)
    removal = allocate(cg, scores, Policy(ratio=0.5, overrides={"layer1.0.conv1": 0.25}))
    assert len(removal[grp.id]) == 16 and len(removal[cg.group_of("layer2.0.conv1.weight", 0).id]) == 64


def test_dry_run_plan_is_what_apply_gives(r18):
    model, x, _gm, _cg = r18
    report = fxslim.prune(model, x, 0.3, ignore=["fc"], dry_run=True)
    text = str(report)
    assert "| group | root |" in text and "MACs" in text
    small = fxslim.prune(model, x, 0.3, ignore=["fc"])
    assert count_params(small) == report.params[1]
    assert count_macs(small, x) == pytest.approx(report.macs[1], rel=1e-9)


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_targets_within_two_percent(r18, kind):
    model, x, _gm, _cg = r18
    kw = {f"target_{kind}": 0.5}
    small = fxslim.prune(model, x, ignore=["fc"], round_to=1, **kw)
    got = count_macs(small, x) / count_macs(model, x) if kind == "macs" else count_params(small) / count_params(model)
    assert abs(got - 0.5) <= 0.01


def test_bad_policy_inputs():
    model = TwoLinear()
    with pytest.raises(fxslim.ArgumentError, match="max_ratio"):
        fxslim.prune(model, torch.ones(1, 1), 0.5, max_ratio=1.5)
    with pytest.raises(fxslim.ArgumentError, match="target"):
        fxslim.prune(model, torch.ones(1, 1), target_macs=2.0)
    with pytest.raises(fxslim.ArgumentError, match="importance must be one of .* take data"):
        fxslim.prune(model, torch.ones(1, 1), importance="taylor")
