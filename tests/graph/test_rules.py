"""Every rule of the table, on a hand-made model, through both oracles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.passes.prune import PruneChannelsPass
from tests.helpers import check_oracles

torch.manual_seed(0)


def cbr(i, o, k=3, g=1):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, groups=g), nn.BatchNorm2d(o), nn.ReLU())


def _randomise(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


class Residual(nn.Module):
    """add, mul, sub residuals; sigmoid gate; in-place relu."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a, self.b, self.c = cbr(16, 16), cbr(16, 16), cbr(16, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        x = x * torch.sigmoid(self.b(x))
        x = F.relu(x - self.c(x))
        return self.head(x)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 12, 3)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.c3 = nn.Conv2d(12, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)
        self.c1d = nn.Conv1d(4, 6, 3)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.inorm(self.c2(F.gelu(self.gn(self.c1(x)))))
        y = self.c3(y).mean((2, 3))
        y = self.fc(self.ln(y))
        z = self.bn1d(self.c1d(x[:, :, 0, :4].reshape(x.shape[0], 4, -1) if False else y[:, :4, None].expand(-1, -1, 5)))
        return y, z


class Pools(nn.Module):
    """max/avg/adaptive/global pooling, dropout, identity, spatial mean/sum."""

    def __init__(self):
        super().__init__()
        self.c1 = cbr(3, 16)
        self.mp, self.ap = nn.MaxPool2d(2), nn.AvgPool2d(2)
        self.c2 = cbr(16, 24)
        self.ad = nn.AdaptiveAvgPool2d(2)
        self.drop, self.idt = nn.Dropout(0.2), nn.Identity()
        self.c3 = nn.Conv2d(24, 20, 1)
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        x = self.ap(self.mp(self.c1(x)))
        x = self.idt(self.drop(self.ad(self.c2(x))))
        x = F.max_pool2d(self.c3(x), 1)
        return self.fc(x.mean((2, 3)) + x.sum(dim=[2, 3]) + F.adaptive_avg_pool2d(x, 1).flatten(1))


class CatSplit(nn.Module):
    """cat with offsets, split with sections, chunk, getitem slices, unbind."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(3, 12)
        self.c = cbr(20, 16)
        self.d1, self.d2 = cbr(6, 10), cbr(10, 10)
        self.e = cbr(8, 8)
        self.f = nn.Conv2d(10 + 8 + 8, 6, 1)

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], dim=1))
        p, q = torch.split(y, [6, 10], dim=1)
        r = self.d1(p) + self.d2(q)
        u, v = y.chunk(2, dim=1)
        w = self.e(u) * v
        s = y[:, 8:]
        return self.f(torch.cat([r, w, s], 1))


class FlattenLinear(nn.Module):
    """flatten/view/reshape into Linear: strided maps and literal sizes."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 16)
        self.b = cbr(3, 6)
        self.fc3 = nn.Linear(6 * 16, 5)
        self.fc4 = nn.Linear(16 + 5, 4)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.a(x), 4)
        y = self.fc1(y.view(y.size(0), 8 * 4 * 4))
        y = self.fc2(F.relu(y)).reshape(-1, 16)
        z = F.adaptive_avg_pool2d(self.b(x), 4)
        z = self.fc3(torch.flatten(z, 1))
        return self.fc4(torch.cat([y, z], -1))


class PermuteLinear(nn.Module):
    """permute/transpose around channel-last Linear layers (ConvNeXt style)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.a(x)
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        y = y.transpose(1, 3).transpose(2, 3)
        return self.out(x + self.scale * y)


class Convs(nn.Module):
    """Conv1d, Conv3d, ConvTranspose2d, depthwise (multiplier 2) and grouped convs."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(32)
        self.gc = nn.Conv2d(32, 24, 3, padding=1, groups=4)
        self.ct = nn.ConvTranspose2d(24, 10, 2, stride=2)
        self.c1 = nn.Conv1d(10, 12, 3)
        self.c3 = nn.Conv3d(12, 6, 1)

    def forward(self, x):
        x = self.ct(F.relu(self.gc(F.relu(self.bn(self.dw(self.a(x)))))))
        y = self.c1(x.flatten(2))
        return self.c3(y[:, :, None, None, :])


class Shuffles(nn.Module):
    """nn.ChannelShuffle, torchvision-style view/transpose shuffle, pixel (un)shuffle."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(3, 8)
        self.cs = nn.ChannelShuffle(2)
        self.c = cbr(16, 16)
        self.ps = nn.PixelShuffle(2)
        self.d = nn.Conv2d(4, 8, 3, padding=1)
        self.pu = nn.PixelUnshuffle(2)
        self.e = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = self.cs(torch.cat([self.a(x), self.b(x)], 1))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        y = self.d(self.ps(self.c(y)))
        return self.e(self.pu(y))


class Tokens(nn.Module):
    """Embedding, free parameters (class token, positional embedding), MHA by heads."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.pos = nn.Parameter(torch.randn(1, 9, 32))
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        x = self.emb(ids)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.fc2(F.relu(self.fc(x)))
        return self.head(x[:, 0])


class Shared(nn.Module):
    """A module called twice: its weights couple both call sites."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.shared = cbr(16, 16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.a(x)
        return self.out(self.shared(self.shared(x)) + x)


IMG = torch.randn(2, 3, 16, 16)
CASES = {
    "residual": (Residual, IMG, 1),
    "norms": (Norms, IMG, 3),
    "pools": (Pools, IMG, 3),
    "cat_split": (CatSplit, IMG, 6),
    "flatten_linear": (FlattenLinear, IMG, 5),
    "permute_linear": (PermuteLinear, IMG, 2),
    "convs": (Convs, IMG, 3),
    "shuffles": (Shuffles, IMG, 3),
    "tokens": (Tokens, torch.randint(0, 50, (2, 8)), 2),
    "shared": (Shared, IMG, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_oracles(name):
    cls, x, n = CASES[name]
    torch.manual_seed(0)
    model = _randomise(cls())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in range(3):
        _gm, _cg, pruned = check_oracles(model, x, seed=seed, expect_prunable=n)
        if pruned is not None:  # the result traces again and can be pruned again
            check_oracles(pruned, x, seed=seed + 10, expect_prunable=1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the user's model was modified"


def test_grouped_conv_keeps_groups_whole():
    model = Convs().eval()
    gm = fxslim.trace(model, IMG)
    cg = fxslim.analyze(gm)
    grp = cg.group_of("gc.weight", 0)
    assert grp.size == 4 and grp.prunable  # the 4 conv groups are the units
    small = fxslim.prune_channels(model, IMG, {"gc": list(range(6, 12))})
    assert small.gc.groups == 3 and small.gc.out_channels == 18 and small.gc.in_channels == 24
    with pytest.raises(fxslim.PlanMismatchError, match="coupled"):
        fxslim.prune_channels(model, IMG, {"gc": [6]})
    # depthwise (x2) then groups of 8: a's channels 4k..4k+3 feed dw's 8k..8k+7 and gc's group k
    a = cg.group_of("a.0.weight", 0)
    assert a is cg.group_of("dw.weight", 0) and a.size == 4
    assert a.channels_of(fxslim.Member("param", "dw.weight", 0, "out"), [1]).tolist() == list(range(8, 16))


def test_mha_prunes_whole_heads():
    model = Tokens().eval()
    ids = torch.randint(0, 50, (2, 8))
    small = fxslim.prune_channels(model, ids, {"emb": list(range(8, 16))})
    assert small.attn.num_heads == 3 and small.attn.embed_dim == 24 and small.attn.head_dim == 8
    assert small.cls.shape == (1, 1, 24) and small.pos.shape == (1, 9, 24)
    with torch.inference_mode():
        assert small(ids).shape == (2, 3)


def test_cat_offsets_map_to_the_right_producer():
    model = CatSplit().eval()
    gm = fxslim.trace(model, IMG)
    cg = fxslim.analyze(gm)
    ga, gb = cg.group_of("a.0.weight", 0), cg.group_of("b.0.weight", 0)
    assert ga is not gb
    # channel 2 of b is channel 8 + 2 of the cat, i.e. column 10 of c's weight
    assert gb.channels_of(fxslim.Member("param", "c.0.weight", 1, "in"), gb.units_of(
        fxslim.Member("param", "b.0.weight", 0, "out"), [2])).tolist() == [10]


def test_flatten_strides_into_linear():
    model = FlattenLinear().eval()
    small = fxslim.prune_channels(model, IMG, {"a.0": [1, 5]})
    assert small.fc1.in_features == 6 * 16
    ref = model.fc1.weight.detach().view(32, 8, 16)[:, [0, 2, 3, 4, 6, 7]].reshape(32, -1)
    assert torch.equal(small.fc1.weight.detach(), ref)


def test_modified_is_computed_both_ways():
    model = Residual().eval()
    gm = fxslim.trace(model, IMG)
    cg = fxslim.analyze(gm)
    res = PruneChannelsPass(cg, {}, IMG)(gm)
    assert res.modified is False
    res = PruneChannelsPass(cg, {"a.0": [0, 1]}, IMG)(gm)
    assert res.modified is True
    res.module.graph.lint()
    assert res.module.get_submodule("a.0").out_channels == 14


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = torch.cumsum(y, dim=1)  # no rule: mixes channels
        return self.c(self.b(y))


def test_unknown_op_pins_and_reports():
    model = Unsupported().eval()
    gm = fxslim.trace(model, IMG)
    cg = fxslim.analyze(gm)
    ga = cg.group_of("a.0.weight", 0)
    assert not ga.prunable
    assert "cumsum" in ga.reason and "node cumsum" in ga.reason
    gb = cg.group_of("b.0.weight", 0)
    assert gb.prunable
    with pytest.raises(fxslim.PinnedChannelsError, match="cumsum"):
        fxslim.prune_channels(model, IMG, {"a.0": [0]})
    check_oracles(model, IMG, expect_prunable=1)  # the rest still prunes, exactly


def test_register_rule_for_user_module():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Conv2d(3, 8, 1), Swish(), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    from fxslim.graph.rules import RULES, elementwise

    gm = fxslim.trace(M(), IMG, leaf_modules=[Swish])
    assert not fxslim.analyze(gm).group_of("a.weight", 0).prunable
    fxslim.register_rule(Swish, elementwise)
    try:
        assert fxslim.analyze(gm).group_of("a.weight", 0).prunable
    finally:
        del RULES[Swish]


def test_prune_ratio_on_handmade():
    model = Residual().eval()
    small = fxslim.prune(model, IMG, 0.5, ignore=["head"])
    assert small.get_submodule("stem.0").out_channels == 8 and small.get_submodule("a.0").out_channels == 8
    assert small.head.out_channels == 4
    np.testing.assert_equal(small(IMG).shape, (2, 4, 16, 16))


def test_members_report_attributes_and_literals():
    gm = fxslim.trace(FlattenLinear().eval(), IMG)
    grp = fxslim.analyze(gm).group_of("a.0.weight", 0)
    kinds = {(m.kind, m.target) for m in grp.members}
    assert ("attr", "a.0.out_channels") in kinds and ("attr", "fc1.in_features") in kinds
    assert ("literal", "view") in kinds  # y.view(n, 8 * 4 * 4): the 128 is rewritten
    assert ("buffer", "a.1.running_mean") in kinds and ("param", "fc1.weight") in kinds


class BatchOne(nn.Module):
    """Sizes computed from x.shape next to literal channel counts (ViT-style)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)
        self.tok = nn.Parameter(torch.randn(1, 1, 16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        n = x.shape[0]
        y = self.proj(x).reshape(n, 16, -1).permute(0, 2, 1)
        y = torch.cat([self.tok.expand(n, -1, -1), y], 1)
        return self.fc(y[:, 0])


def test_batch_of_one_stays_symbolic():
    model = BatchOne().eval()
    x1 = torch.randn(1, 3, 16, 16)
    small = fxslim.prune_channels(model, x1, {"proj": [0, 5]})
    assert "reshape(getitem, 14" in small.code or "reshape(n, 14" in small.code or ", 14, -1)" in small.code
    with torch.inference_mode():
        assert small(torch.randn(5, 3, 16, 16)).shape == (5, 3)


# ---------------------------------------------------------------------------------------
# function forms: the same layers reached through F.* with parameter operands (get_attr)


class _BatchNorm(nn.BatchNorm2d):
    """timm's BatchNormAct2d, minus the activation: F.batch_norm on its own tensors."""

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _InstanceNorm(nn.InstanceNorm2d):
    def forward(self, x):
        return F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                               not self.track_running_stats, 0.0, self.eps)


def _traced_into(cls):
    """A subclass defined outside torch.nn (fx traces into it) that keeps the forward."""
    return type(f"Fn{cls.__name__}", (cls,), {"__module__": __name__})


_FN = {c.__name__: _traced_into(c) for c in (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.PReLU, nn.Embedding,
)}
_FN |= {"BatchNorm2d": _BatchNorm, "BatchNorm1d": _BatchNorm, "BatchNorm3d": _BatchNorm,
        "InstanceNorm2d": _InstanceNorm}


class Layers(nn.Module):
    """Every layer with a module rule; with fn=True each is a subclass that fx traces into,
    so the graph holds F.conv2d(x, c1.weight, ...), F.batch_norm(x, bn.running_mean, ...)."""

    def __init__(self, fn: bool = False):
        super().__init__()
        L = _FN if fn else {k: getattr(nn, k) for k in _FN}
        self.c1, self.bn, self.pr = L["Conv2d"](3, 16, 3, padding=1), L["BatchNorm2d"](16), L["PReLU"](16)
        self.dw, self.gn = L["Conv2d"](16, 32, 3, padding=1, groups=16), L["GroupNorm"](4, 32)
        self.gc = L["Conv2d"](32, 24, 1, groups=4)
        self.inorm = L["InstanceNorm2d"](24, affine=True, track_running_stats=True)
        self.gn1 = L["GroupNorm"](1, 24)  # one group: a statistic over every channel
        self.ct = L["ConvTranspose2d"](24, 12, 2, stride=2)
        self.c1d, self.bn1d, self.ct1d = L["Conv1d"](12, 10, 3), L["BatchNorm1d"](10), L["ConvTranspose1d"](10, 8, 3)
        self.c3d, self.bn3d, self.ct3d = L["Conv3d"](8, 6, 1), L["BatchNorm3d"](6), L["ConvTranspose3d"](6, 4, 1)
        self.ln, self.fc = L["LayerNorm"](4), L["Linear"](4, 5)

    def forward(self, x):
        y = self.pr(self.bn(self.c1(x)))
        y = F.relu(self.gn(self.dw(y)))
        y = self.gn1(self.inorm(self.gc(y)))
        y = F.adaptive_avg_pool2d(self.ct(y), 4)
        z = self.ct1d(self.bn1d(self.c1d(y.flatten(2))))
        w = self.ct3d(self.bn3d(self.c3d(z[:, :, None, None, :])))
        return self.fc(self.ln(w.mean((2, 3, 4))))


class FnTokens(nn.Module):
    """F.embedding, F.layer_norm and F.linear on module tensors."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = _FN["Embedding"](50, 16), _FN["LayerNorm"](16)
        self.fc, self.fc2, self.head = _FN["Linear"](16, 32), _FN["Linear"](32, 16), _FN["Linear"](16, 3)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.fc2(F.gelu(self.fc(self.ln(x))))
        return self.head(x)


class FnPools(nn.Module):
    """Every pooling function, 1d to 3d: channels pass through."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), nn.Conv1d(8, 8, 1), nn.Conv3d(8, 8, 1)
        self.fc = nn.Linear(8 * 8, 3)

    def forward(self, x):
        y = self.a(x)  # N, 8, 16, 16
        y = (F.max_pool2d(y, 2) + F.avg_pool2d(y, 2) + F.lp_pool2d(y, 2, 2)
             + F.adaptive_max_pool2d(y, 8) + F.adaptive_avg_pool2d(y, 8))
        z = self.b(y.flatten(2))  # N, 8, 64
        z = (F.max_pool1d(z, 2) + F.avg_pool1d(z, 2) + F.lp_pool1d(z, 2, 2)
             + F.adaptive_max_pool1d(z, 32) + F.adaptive_avg_pool1d(z, 32))
        w = self.c(z.view(z.shape[0], 8, 2, 4, 4))
        w = (F.max_pool3d(w, (1, 2, 2)) + F.avg_pool3d(w, (1, 2, 2)) + F.lp_pool3d(w, 2, (1, 2, 2))
             + F.adaptive_max_pool3d(w, (2, 2, 2)) + F.adaptive_avg_pool3d(w, (2, 2, 2)))
        return self.fc(w.flatten(1))


class SharedFn(nn.Module):
    """One conv called as a module and, on its own weight, as F.conv2d: both forms slice
    the same tensors, and the kept nn.Conv2d's attributes follow."""

    def __init__(self):
        super().__init__()
        self.a, self.conv, self.out = cbr(3, 8), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = F.relu(self.conv(y)) + y
        return self.out(F.conv2d(y, self.conv.weight, self.conv.bias, padding=1))


FN_CASES = {  # model, input, prunable groups at least, the function forms in its graph
    "fn_layers": (lambda: Layers(fn=True), IMG, 6, {
        F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
        F.batch_norm, F.instance_norm, F.layer_norm, F.group_norm, F.prelu, F.linear}),
    "fn_tokens": (FnTokens, torch.randint(0, 50, (2, 8)), 2, {F.embedding, F.layer_norm, F.linear}),
    "fn_pools": (FnPools, IMG, 3, {
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.lp_pool1d, F.lp_pool2d, F.lp_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
        F.adaptive_max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}),
    "shared_fn": (SharedFn, IMG, 1, {F.conv2d}),
}


@pytest.mark.parametrize("name", list(FN_CASES))
def test_function_form_oracles(name):
    cls, x, n, functions = FN_CASES[name]
    torch.manual_seed(0)
    model = _randomise(cls())
    gm = fxslim.trace(model, x)
    assert functions <= {n.target for n in gm.graph.nodes if n.op == "call_function"}
    for seed in range(3):
        _gm, _cg, pruned = check_oracles(model, x, seed=seed, expect_prunable=n)
        check_oracles(pruned, x, seed=seed + 10, expect_prunable=1)  # prunes again


def _structure(cg):
    """Groups as (size, prunable, stat, sorted tensor members): comparable across forms."""
    return sorted(
        (g.size, g.prunable, g.stat, tuple(sorted((m.kind, m.target, m.dim, m.role) for m in g.members
                                                  if m.kind in ("param", "buffer"))))
        for g in cg.groups
    )


def test_function_and_module_forms_share_one_rule():
    """The same layers as modules and as function forms: identical groups, member by member."""
    torch.manual_seed(0)
    mod = _randomise(Layers(fn=False)).eval()
    fn = Layers(fn=True).eval()
    fn.load_state_dict(mod.state_dict())
    gm_mod, gm_fn = fxslim.trace(mod, IMG), fxslim.trace(fn, IMG)
    assert F.conv_transpose3d in {n.target for n in gm_fn.graph.nodes}
    assert not any(n.op == "call_function" and n.target is F.conv2d for n in gm_mod.graph.nodes)
    s_mod, s_fn = _structure(fxslim.analyze(gm_mod)), _structure(fxslim.analyze(gm_fn))
    assert s_fn == s_mod
    # the roles name what changes: conv rows out, BN statistics norm, next conv columns in
    cg = fxslim.analyze(gm_fn)
    grp = cg.group_of("c1.weight", 0)
    assert grp.root == fxslim.Member("param", "c1.weight", 0, "out")
    assert {fxslim.Member("buffer", "bn.running_var", 0, "norm"), fxslim.Member("param", "pr.weight", 0, "norm")} \
        <= set(grp.members)
    assert cg.group_of("c1.weight", 2) is None  # a kernel dim is no channel group
    with torch.inference_mode():
        torch.testing.assert_close(gm_fn(IMG), gm_mod(IMG), rtol=1e-5, atol=1e-6)


def test_function_form_rewrites_sizes_written_in_the_call():
    """groups of F.conv2d and num_groups of F.group_norm follow whole removed groups;
    F.layer_norm's normalized_shape follows its dim; modified is computed both ways."""
    model = _randomise(Layers(fn=True)).eval()
    gm = fxslim.trace(model, IMG)
    cg = fxslim.analyze(gm)
    assert PruneChannelsPass(cg, {}, IMG)(gm).modified is False
    # dw has 16 conv groups of 2 (depthwise x2), gn 4 groups of 8: removing c1 channels
    # 0..7 removes dw groups 0..7, i.e. gn groups 0 and 1
    res = PruneChannelsPass(cg, {"c1": list(range(8))}, IMG)(gm)
    assert res.modified is True
    small = res.module
    small.graph.lint()
    node = {n.name: n for n in small.graph.nodes}
    assert node["conv2d_1"].args[6] == 8 and small.dw.weight.shape == (16, 1, 3, 3)
    assert node["group_norm"].args[1] == 2 and small.gn.weight.shape == (16,)
    assert small.bn.running_mean.shape == (8,) and small.pr.weight.shape == (8,)
    with torch.inference_mode():
        assert small(IMG).shape == (2, 5)
    res = PruneChannelsPass(cg, {"ct3d": [0]}, IMG)(gm)  # F.layer_norm(x, (4,)) -> (3,)
    ln = next(n for n in res.module.graph.nodes if n.target is F.layer_norm)
    assert tuple(ln.args[1]) == (3,)


def test_kept_module_follows_a_function_form_of_its_weight():
    model = _randomise(SharedFn()).eval()
    small = fxslim.prune_channels(model, IMG, {"a.0": [1, 2, 5]})
    assert small.conv.out_channels == small.conv.in_channels == 5 and small.conv.weight.shape == (5, 5, 3, 3)
    kinds = {(m.kind, m.target) for m in fxslim.analyze(fxslim.trace(model, IMG)).group_of("a.0.weight", 0).members}
    assert {("attr", "conv.out_channels"), ("attr", "conv.in_channels"), ("param", "conv.weight")} <= kinds
    with torch.inference_mode():
        assert small(IMG).shape == (2, 4, 16, 16)


def test_cost_model_prices_function_forms_by_their_weights():
    from fxslim.passes.estimate import CostModel
    from fxslim.runtime.measure import count_macs

    model = _randomise(Layers(fn=True)).eval()
    x = IMG[:1]
    gm = fxslim.trace(model, x)
    cg = fxslim.analyze(gm)
    removal = {g.id: list(range(g.size // 2)) for g in cg.groups if g.prunable}
    plan = fxslim.make_plan(cg, removal)
    small = fxslim.apply_plan(gm, cg, plan, x)
    est = CostModel(gm, cg, x).macs(plan.keep, plan.class_removed)
    assert est == pytest.approx(count_macs(small, x), rel=1e-6)


class WeightStandardised(nn.Conv2d):
    """A computed weight (timm's StdConv2d computes it): no rule guesses its channels."""

    def forward(self, x):
        return F.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.std = WeightStandardised(8, 8, 3, padding=1)
        self.std.gain = nn.Parameter(torch.rand(8, 1, 1, 1) + 0.5)
        self.b, self.c = cbr(8, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.b(self.std(self.a(x))))


def test_computed_weight_operand_pins_with_reason():
    model = StdNet().eval()
    gm = fxslim.trace(model, IMG)
    cg = fxslim.analyze(gm)
    ga = cg.group_of("a.0.weight", 0)
    assert not ga.prunable
    assert "the weight of 'conv2d' at 'std'" in ga.reason and "is computed" in ga.reason
    assert cg.group_of("b.0.weight", 0).prunable
    with pytest.raises(fxslim.PinnedChannelsError, match="computed"):
        fxslim.prune_channels(model, IMG, {"a.0": [0]})
    check_oracles(model, IMG, expect_prunable=1)


# ---------------------------------------------------------------------------------------
# attention written the timm way: fused qkv, reshape(B, N, 3, H, D), permute, unbind


class TimmAttention(nn.Module):
    """timm's Attention: whole heads go (their q, k and v rows and their proj columns);
    head_dim and the softmax scale stay as they were."""

    def __init__(self, dim=32, heads=4, fused=True, qk_norm=False, rel_pos=0):
        super().__init__()
        self.num_heads, self.head_dim, self.fused = heads, dim // heads, fused
        if rel_pos:  # Swin's relative-position bias: a (positions, heads) table gathered by index
            self.table = nn.Parameter(torch.randn(2 * rel_pos - 1, heads))
            pos = torch.arange(rel_pos)
            self.register_buffer("index", (pos[:, None] - pos[None, :] + rel_pos - 1).flatten())
        self.scale = self.head_dim ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if hasattr(self, "table"):
                attn = attn + self.table[self.index].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Encoder(nn.Module):
    def __init__(self, fused=True, qk_norm=False, rel_pos=0):
        super().__init__()
        self.embed, self.norm = nn.Linear(12, 32), nn.LayerNorm(32)
        self.attn = TimmAttention(fused=fused, qk_norm=qk_norm, rel_pos=rel_pos)
        self.fc1, self.fc2, self.head = nn.Linear(32, 48), nn.Linear(48, 32), nn.Linear(32, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.norm(x))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


TOKENS = torch.randn(2, 6, 12)


@pytest.mark.parametrize("fused,qk_norm,rel_pos", [(True, False, 0), (False, False, 0), (True, True, 0),
                                                   (False, False, 6)])
def test_timm_attention_oracles(fused, qk_norm, rel_pos):
    torch.manual_seed(0)
    model = Encoder(fused, qk_norm, rel_pos)
    for seed in range(2):
        _gm, cg, pruned = check_oracles(model, TOKENS, seed=seed, expect_prunable=3)
        heads = cg.group_of("attn.qkv.weight", 0)
        assert heads.prunable and heads.size == 4 and not heads.stat
        assert heads is cg.group_of("attn.proj.weight", 1)
        if rel_pos:  # the bias table loses the removed heads' columns; its rows are no group
            assert heads is cg.group_of("attn.table", 1) and cg.group_of("attn.table", 0) is None
            assert pruned.attn.table.shape[1] == pruned.attn.qkv.weight.shape[0] // 24
        check_oracles(pruned, TOKENS, seed=seed + 10, expect_prunable=1)


def test_timm_attention_prunes_whole_heads():
    torch.manual_seed(0)
    model = Encoder().eval()
    gm = fxslim.trace(model, TOKENS)
    cg = fxslim.analyze(gm)
    assert PruneChannelsPass(cg, {}, TOKENS)(gm).modified is False
    head1 = [s * 32 + 8 + d for s in range(3) for d in range(8)]  # q, k and v rows of head 1
    res = PruneChannelsPass(cg, {"attn.qkv": head1}, TOKENS)(gm)
    assert res.modified is True
    small = res.module
    small.graph.lint()
    assert small.attn.qkv.weight.shape == (72, 32) and small.attn.proj.weight.shape == (32, 24)
    keep = [i for i in range(96) if i not in head1]
    assert torch.equal(small.attn.qkv.weight, model.attn.qkv.weight.detach()[keep])
    shapes = [n.args[1:] for n in small.graph.nodes if n.target == "reshape"]
    assert shapes[0][2:] == (3, 3, 8) and shapes[1][2] == 24  # 3 heads of 8: head_dim stays
    dead = copy.deepcopy(model)
    with torch.no_grad():  # head 1 dead: zero q, k, v rows make its output exactly zero
        dead.attn.qkv.weight[head1] = 0
        dead.attn.qkv.bias[head1] = 0
    with torch.inference_mode():
        torch.testing.assert_close(small(TOKENS), dead(TOKENS), rtol=1e-5, atol=1e-6)
    with pytest.raises(fxslim.PlanMismatchError, match="coupled"):
        fxslim.prune_channels(model, TOKENS, {"attn.qkv": list(range(8, 16))})  # q rows only


class TorchvisionSwin(nn.Module):
    """torchvision's Swin blocks (shifted window attention, relative-position bias, patch
    merging): wrapped functions, each with a rule."""

    def __init__(self, v2: bool = False):
        from torchvision.models import swin_transformer as swin

        super().__init__()
        block = swin.SwinTransformerBlockV2 if v2 else swin.SwinTransformerBlock
        merge = swin.PatchMergingV2 if v2 else swin.PatchMerging
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.blocks = nn.Sequential(block(16, 4, [4, 4], [0, 0]), block(16, 4, [4, 4], [2, 2]))
        self.merge = merge(16)
        self.block3 = block(32, 4, [4, 4], [0, 0])
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = self.merge(self.blocks(self.stem(x).permute(0, 2, 3, 1)))
        return self.head(self.block3(x).mean((1, 2)))


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_swin_prunes_whole_heads(v2):
    torch.manual_seed(0)
    model = TorchvisionSwin(v2).eval()
    x = torch.randn(2, 3, 20, 20)  # 10 x 10 tokens: padded to the 4 x 4 windows and sliced back
    for seed in range(2):
        _gm, cg, pruned = check_oracles(model, x, seed=seed, expect_prunable=2)
        check_oracles(pruned, x, seed=seed + 10, expect_prunable=1)
    stream = cg.group_of("stem.weight", 0)  # the embed dim is the heads: blocks of head_dim 4
    assert stream.size == 4 and stream is cg.group_of("blocks.0.attn.qkv.weight", 1)
    assert stream is cg.group_of("blocks.1.attn.qkv.weight", 0) is cg.group_of("blocks.1.attn.proj.weight", 0)
    table = "blocks.0.attn.cpb_mlp.2.weight" if v2 else "blocks.0.attn.relative_position_bias_table"
    assert stream is cg.group_of(table, 0 if v2 else 1)
    graph = fxslim.prune_channels(model, x, {"stem": [4, 5, 6, 7]}, keep_classes=False)  # head 1 of every block
    calls = [n for n in graph.graph.nodes if getattr(n.target, "__name__", "") == "shifted_window_attention"]
    assert [n.args[5] for n in calls] == [3, 3, 4]  # num_heads follows, head_dim stays 4
    small = fxslim.prune_channels(model, x, {"stem": [4, 5, 6, 7]})  # the user's classes, sizes synced
    assert type(small) is type(model)
    assert [m.num_heads for m in small.modules() if hasattr(m, "num_heads")] == [3, 3, 4]
    with torch.inference_mode():
        torch.testing.assert_close(small(x), graph(x))
    assert small.get_submodule("blocks.0.attn.qkv").weight.shape == (36, 12)
    assert small.merge.reduction.weight.shape == (32, 48)  # 4 x 12 merged channels in
    if v2:
        assert small.get_submodule("blocks.1.attn").logit_scale.shape == (3, 1, 1)
    with torch.inference_mode():
        assert small(x).shape == (2, 3)


class _ResizedGrid(nn.Module):
    """SAM2-Hiera's shape: a parameter grid resized onto the feature map (bicubic mixes
    neighbouring positions, so the grid's rows and columns are not channels), then
    pooled and padded, which mix positions the same way."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grid = nn.Parameter(torch.randn(1, 8, 5, 5))
        self.cells = nn.Parameter(torch.randn(1, 8, 6, 6))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        y = y + F.interpolate(self.grid, size=y.shape[-2:], mode="bicubic", align_corners=False)
        y = y + F.pad(F.avg_pool2d(self.cells, 2), (2, 3, 2, 3))
        return self.fc(y.mean((2, 3)))


def test_positions_mixed_by_resizing_pooling_or_padding_are_not_channels():
    model = _ResizedGrid().eval()
    _gm, cg, _ = check_oracles(model, torch.randn(1, 3, 8, 8), expect_prunable=1)
    for g in cg.groups:  # only the 8 channels prune: grid and cell positions are pinned
        grid_dims = {(m.target, m.dim) for m in g.members} & {("grid", 2), ("grid", 3), ("cells", 2), ("cells", 3)}
        assert not (g.prunable and grid_dims), str(g)


class _ReshapeToSizeObject(nn.Module):
    """EVA's shape: t.reshape(x.shape), one size object for the whole shape."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        y = self.fc1(x)
        z = torch.relu(y.flatten(1))
        return self.fc2(z.reshape(y.shape))


def test_reshape_to_a_size_object_prunes_and_stays_symbolic_in_batch():
    model = _ReshapeToSizeObject().eval()
    _gm, _cg, pruned = check_oracles(model, torch.randn(2, 4, 8), expect_prunable=1)
    assert pruned.fc1.out_features < 16  # the channels through the size object pruned


class _PickedPositions(nn.Module):
    """CSATv2's shape: x[:, :, [zigzag order]] picks positions by a constant list."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x)).flatten(2)  # (B, C, H*W)
        y = y[:, :, [0, 1, 4, 8, 5, 2, 3, 6]]
        return self.fc(y.mean(2))


def test_constant_index_list_picks_positions_and_channels_still_prune():
    _gm, _cg, pruned = check_oracles(_PickedPositions().eval(), torch.randn(2, 3, 4, 4), expect_prunable=1)
    assert pruned.conv.out_channels < 8


class _ConvAcrossFeatures(nn.Module):
    """CoaT's aggregate head: a Conv1d over three stacked feature vectors, its length dim
    the model's feature dim; `k` > 1 mixes neighbouring features instead."""

    def __init__(self, k: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(6, 16)
        self.aggregate = nn.Conv1d(2, 1, kernel_size=k, padding=k // 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.stack([self.fc1(x), self.fc2(x)], dim=1)  # (B, 2, 16)
        return self.head(self.aggregate(y).squeeze(1))


def test_conv_length_dim_carrying_features_couples_or_pins():
    x = torch.randn(3, 6)
    _gm, cg, pruned = check_oracles(_ConvAcrossFeatures(1).eval(), x, expect_prunable=1)
    # pointwise: feature f of both branches reaches head column f, one group of 16
    grp = cg.group_of("head.weight", 1)
    assert grp is not None and grp.prunable and grp.size == 16
    assert {("fc1.weight", 0), ("fc2.weight", 0)} <= {(m.target, m.dim) for m in grp.members}
    assert pruned.head.in_features < 16
    gm = fxslim.trace(_ConvAcrossFeatures(3).eval(), x)
    grp = fxslim.analyze(gm).group_of("fc1.weight", 0)
    assert grp is not None and not grp.prunable and "spatial dim of" in str(grp)  # a 3-wide conv mixes features
