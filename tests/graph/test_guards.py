"""What symbolic tracing would silently change stays as it was: custom backward passes,
grad-mode regions, hooks, in-place buffer updates (fxslim/graph/_guards.py)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import fxslim
from fxslim.graph import rules as R

X = torch.randn(2, 3, 8, 8)


class RoundSTE(torch.autograd.Function):
    """Rounding with a straight-through gradient: tracing its forward would give zero."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Quantised(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.mid(RoundSTE.apply(self.stem(x))))


def _input_grad(model, x):
    x = x.clone().requires_grad_()
    model(x).square().sum().backward()
    return x.grad


def test_custom_backward_survives_trace_and_prune():
    torch.manual_seed(0)
    model = Quantised().eval()
    want = _input_grad(model, X)
    assert want.abs().sum() > 0
    gm = fxslim.trace(model, X)
    assert torch.equal(_input_grad(gm, X), want)  # the straight-through gradient, not zero
    assert sum(n.target is not None and getattr(n.target, "autograd_function", None) is RoundSTE
               for n in gm.graph.nodes) == 1
    gm.graph.lint()
    groups = fxslim.analyze(gm)
    stem = groups.group_of("stem.weight", 0)
    assert not stem.prunable and "no rule for 'RoundSTE.apply'" in stem.reason
    mid = groups.group_of("mid.weight", 0)
    assert mid.prunable
    small = fxslim.prune(model, X, 0.5)
    assert small.get_submodule("stem").out_channels == 8 and small.get_submodule("mid").out_channels == 4
    # every path from the input crosses the rounding, whose own gradient is zero
    assert _input_grad(small, X).abs().sum() > 0


def test_a_registered_rule_for_an_autograd_function_makes_it_prunable():
    model = Quantised().eval()
    R.register_rule(RoundSTE, R.elementwise)
    try:
        gm = fxslim.trace(model, X)
        stem = fxslim.analyze(gm).group_of("stem.weight", 0)
        assert stem.prunable
        small = fxslim.prune(model, X, 0.5)
        assert small.get_submodule("stem").out_channels == 4
        with torch.no_grad():
            y = small(X)
        assert y.shape == (2, 4, 8, 8)
    finally:
        R.RULES.pop(RoundSTE)


class GradRegions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    @torch.no_grad()
    def frozen(self, y):
        return self.b(y)

    def forward(self, x):
        y = self.a(x)
        with torch.no_grad():
            z = self.b(y)
            with torch.enable_grad():
                w = self.b(y)  # the only path that trains b
        with torch.set_grad_enabled(False):
            z = z * 2
        return self.c(y + z + w + self.frozen(y))


@pytest.mark.parametrize("outer", ["grad", "no_grad"])
def test_grad_mode_regions_are_kept(outer):
    torch.manual_seed(0)
    model = GradRegions().eval()
    gm = fxslim.trace(model, X)
    small = fxslim.prune(model, X, 0.5, keep_classes=False)  # the regions in the rewritten graph
    for m in (model, gm, small):
        m.zero_grad()
    if outer == "grad":
        for m in (model, gm):
            m(X).sum().backward()
        for name, p in model.named_parameters():  # dropped regions would train b through z too
            torch.testing.assert_close(gm.get_parameter(name).grad, p.grad, rtol=1e-5, atol=1e-6)
        small(X).sum().backward()
        assert small.get_submodule("b").weight.grad is not None
    else:
        with torch.no_grad():
            outs = [m(X) for m in (model, gm)]
            assert not torch.is_grad_enabled()  # leaving the regions restored the caller's mode
        assert not outs[1].requires_grad
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    assert torch.is_grad_enabled()
    small.graph.lint()


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # an in-place update torch.fx would run once, at trace time
        return self.head(self.conv(x)) + self.calls


def test_in_place_buffer_update_is_recorded_and_the_user_model_untouched():
    model = Counting().eval()
    for share in (False, True):
        gm = fxslim.trace(model, X, share_weights=share)
        assert float(model.calls) == 0.0  # tracing never ran the update on the user's buffer
        assert any(n.op == "call_method" and n.target == "add_" for n in gm.graph.nodes)
    small = fxslim.prune(model, X, 0.5)
    assert float(model.calls) == 0.0
    with torch.no_grad():
        y0, y1 = model(X), small(X)
    assert float(model.calls) == 1.0 and float(small.calls) == 1.0  # each counts its own calls
    assert small.get_submodule("conv").out_channels == 4 and y1.shape == y0.shape


def test_hooked_submodules_stay_whole_and_their_hooks_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    seen = []
    model[2].register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    model[0].weight.register_hook(lambda g: g * 0)  # freezes the first layer's weights
    groups = fxslim.channel_groups(model, X)
    first = next(g for g in groups if any(m.module == "0" for m in g.members))
    assert not first.prunable and "gradient hooks on weight" in first.reason
    second = next(g for g in groups if any(m.module == "2" and m.role != "in" for m in g.members))
    assert not second.prunable and "module '2' has forward hooks" in second.reason
    small = fxslim.prune(model, X, 0.5)
    seen.clear()
    small(X).sum().backward()
    assert seen == [(2, 8, 4, 4)]  # the forward hook fired on the pruned model
    assert torch.count_nonzero(small.get_submodule("0").weight.grad) == 0  # the gradient hook too


def test_hooks_on_the_model_itself_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
    model.register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(fxslim.TraceError, match="on the model itself"):
        fxslim.prune(model, X, 0.5)


def test_compiler_disabled_regions_trace_and_match():
    class Disabled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 4, 1)

        @torch.compiler.disable
        def act(self, y):
            return torch.relu(y) * 2

        def forward(self, x):
            return self.head(self.act(self.conv(x)))

    model = Disabled().eval()
    gm = fxslim.trace(model, X)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X), rtol=1e-5, atol=1e-6)
    assert fxslim.prune(model, X, 0.5).get_submodule("conv").out_channels == 4


@pytest.mark.parametrize("folder", ["fxslim", "torch"])
def test_user_code_under_a_folder_named_like_a_library_is_named(tmp_path, monkeypatch, folder):
    """The user's own code may live under .../fxslim/ or .../torch/ (a clone named fxslim)."""
    pkg = tmp_path / folder / "mycode"
    pkg.mkdir(parents=True)
    (pkg / "gated_model.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 3, 1)

            def forward(self, x):
                if x.sum() > 0:  # data-dependent
                    return self.conv(x)
                return x
    """))
    monkeypatch.syspath_prepend(str(pkg))
    import gated_model

    try:
        with pytest.raises(fxslim.TraceError) as info:
            fxslim.trace(gated_model.Gated(), X, capture="fx")  # "auto" would record one run
    finally:
        import sys

        sys.modules.pop("gated_model", None)
    assert f"{folder}/mycode/gated_model.py" in str(info.value) and "x.sum() > 0" in str(info.value)
