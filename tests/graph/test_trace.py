"""Tracing, shape metadata, and typed errors for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = Gate()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.bn(self.stem(x))))


X = torch.randn(2, 3, 8, 8)


def test_untraceable_names_module_line_and_way_out():
    with pytest.raises(fxslim.TraceError) as info:  # "auto" would record one run instead
        fxslim.trace(Net(), X, capture="fx")
    msg = str(info.value)
    assert "'block'" in msg and "test_trace.py" in msg and "x.sum() > 0" in msg
    assert "leaf" in msg and "concrete_args" in msg


def test_leaf_module_way_out_is_correct_and_pinned():
    model = Net().eval()
    gm = fxslim.trace(model, X, leaf_paths=["block"])
    stem = fxslim.analyze(gm).group_of("stem.weight", 0)
    assert not stem.prunable and "Gate at 'block'" in stem.reason
    with torch.inference_mode():
        assert torch.equal(gm(X), model(X))


def test_shapes_on_every_node_and_model_untouched():
    model = Net()
    model.block = nn.Identity()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxslim.trace(model, X)
    for n in gm.graph.nodes:
        if n.op != "output":
            assert n.meta["tensor_meta"].shape is not None, n.name
    assert gm.training  # mode is kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    small = fxslim.prune_channels(model, X, {"stem": [0, 1]})
    assert small.stem.out_channels == 6 and model.stem.out_channels == 8


def test_bad_inputs_raise_typed_errors():
    model = Net()
    model.block = nn.Identity()
    with pytest.raises(fxslim.TraceError, match="example_inputs"):
        fxslim.trace(model, "not a tensor")
    with pytest.raises(fxslim.TraceError, match="does not run"):
        fxslim.trace(model, torch.randn(2, 5, 8, 8))
    with pytest.raises(fxslim.PlanMismatchError, match="no layer 'nope'"):
        fxslim.prune_channels(model, X, {"nope": [0]})
    with pytest.raises(fxslim.PlanMismatchError, match="8 output channels"):
        fxslim.prune_channels(model, X, {"stem": [8]})
    with pytest.raises(fxslim.PinnedChannelsError, match="model output"):
        fxslim.prune_channels(model, X, {"head": [0]})
    with pytest.raises(fxslim.PlanMismatchError, match="empty"):
        fxslim.prune_channels(model, X, {"stem": list(range(8))})
    with pytest.raises(fxslim.ArgumentError, match="ratio"):
        fxslim.prune(model, X, ratio=1.5)
    assert issubclass(fxslim.PinnedChannelsError, fxslim.FxslimError)


def test_tracing_adds_nothing_to_the_users_model():
    class Const(nn.Module):
        def forward(self, x):
            return x * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)  # a tensor constant

    model = Const()
    before = set(vars(model))
    gm = fxslim.trace(model, X)
    assert set(vars(model)) == before and not hasattr(model, "_tensor_constant0")
    assert hasattr(gm, "_tensor_constant0")


@pytest.mark.parametrize("mod", [
    nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2), nn.MaxPool2d((3, 2), (2, 1), (1, 0), dilation=(2, 1)),
    nn.AvgPool2d(3, 2, 1), nn.MaxPool1d(3, 2), nn.AvgPool3d(2, 1), nn.AvgPool1d(3, 2, 1),
    nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((None, 3)), nn.AdaptiveMaxPool1d(4), nn.AdaptiveAvgPool3d((2, None, 1)),
], ids=repr)
def test_pool_shape_formulas_match_real_runs(mod):
    from fxslim.graph.shapes import _fast_shape

    nsp = int(type(mod).__name__[-2])
    shapes = [(2, 3, *([s] * nsp)) for s in (7, 8, 13)]
    if "Adaptive" in type(mod).__name__:
        shapes.append((3, *([9] * nsp)))  # unbatched
    for shape in shapes:
        x = torch.randn(shape)
        assert _fast_shape("pool", mod, x) == tuple(mod(x).shape)


_F = nn.functional


@pytest.mark.parametrize("fn, args, kwargs", [
    (_F.adaptive_avg_pool2d, ((1, 1),), {}), (_F.adaptive_avg_pool2d, (3,), {}),
    (_F.adaptive_avg_pool2d, ((None, 2),), {}), (_F.adaptive_max_pool1d, (4,), {}),
    (_F.adaptive_avg_pool3d, ((2, None, 1),), {}), (_F.adaptive_max_pool2d, (), {"output_size": 2}),
    (torch.flatten, (), {}), (torch.flatten, (1,), {}), (torch.flatten, (1, 2), {}),
    (torch.flatten, (), {"start_dim": -2}), (torch.flatten, (0,), {"end_dim": 1}),
], ids=lambda v: getattr(v, "__name__", repr(v)))
def test_function_shape_formulas_match_real_runs(fn, args, kwargs):
    from fxslim.graph.shapes import _function_shape, _Shaped

    nsp = {"1d": 1, "2d": 2, "3d": 3}.get(fn.__name__[-2:], 2)
    shapes = [(2, 3, *([s] * nsp)) for s in (7, 8, 13)]
    if "pool" in fn.__name__:
        shapes.append((3, *([9] * nsp)))  # unbatched
    for shape in shapes:
        x = torch.randn(shape)
        got = _function_shape(fn, (_Shaped(x.shape, x.dtype), *args), kwargs)
        assert got is not None and got.shape == tuple(fn(x, *args, **kwargs).shape)
