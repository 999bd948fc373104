"""The run capture (`fxslim.graph.run_capture`) on hand-made models that torch.fx and
torch.export cannot capture: data-dependent branches and data-dependent shapes.

Each model: ``trace(capture="auto")`` falls back to recording one eager run (logged, and
the GraphModule says it is specialised and refuses to run); the rule table couples the
recorded calls (module leaves, function forms with parameter operands, Tensor methods
and operators); data-dependent ops pin what they touch, naming the op and the module
path; a prune slices the user's own class, proven by the slicing and dead-channel
oracles, and the result runs on other input sizes.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim.errors import TraceError
from fxslim.graph.analysis import analyze
from fxslim.passes.policy import uniform_removal
from fxslim.passes.prune import apply_plan, make_plan
from fxslim.passes.verify import dead_channel_check, slicing_mismatches
from tests.zoo.zoo import random_removal

RTOL, ATOL = 1e-4, 1e-5


class Gate(nn.Module):
    """A residual block taken only when the features are positive on average."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        # a branch on a value: torch.fx cannot follow it, torch.export cannot guard it
        if x.mean() > 0:
            x = x + F.relu(self.bn(self.conv(x)))
        return x


class Picker(nn.Module):
    """Backbone, gated block, a function-form layer, and a head whose scores are thresholded
    (a data-dependent number of picks, as detectors' postprocessing)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.gate = Gate(16)
        self.proj = nn.Conv2d(16, 24, 1)
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, images: list[torch.Tensor]):
        x = torch.stack(images)
        y = self.gate(self.stem(x))
        # the function form, with the module's parameters
        z = F.hardswish(F.conv2d(y, self.proj.weight, self.proj.bias))
        scores = self.head(z).amax(dim=(2, 3))
        keep = (scores > 0).nonzero()
        return [
            {"scores": s[keep[keep[:, 0] == i, 1]], "width_profile": f.sum((0, 1))}
            for i, (s, f) in enumerate(zip(scores, z))
        ]


def _model() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = Picker().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(0.0, 0.5)
    images = [
        torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(i)) + 0.5 for i in range(2)
    ]
    return model, (images,)


def test_auto_falls_back_to_run_capture_and_says_it_is_specialised(caplog):
    model, x = _model()
    with caplog.at_level(logging.WARNING, logger="fxslim.graph.trace"):
        gm = fxslim.trace(model, x)
    assert gm.meta["fxslim_capture"]["kind"] == "run"
    assert "one eager run" in gm.meta["fxslim_capture"]["specialised"]
    assert "torch.fx and torch.export cannot capture Picker" in caplog.text
    with pytest.raises(TraceError, match="records one eager run"):
        gm(*x)
    ops = {
        n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        for n in gm.graph.nodes
    }
    assert {"stem.0", "gate.conv", "conv2d", "hardswish", "add", "nonzero"} <= ops
    conv2d = next(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "conv2d")
    # parameters by their names; the top level's forward is the path ""
    assert [a.target for a in conv2d.args[1:3]] == ["proj.weight", "proj.bias"]
    assert next(reversed(conv2d.meta["nn_module_stack"].values()))[0] == ""
    # x + y reaches the mode as Tensor.add
    add = next(n for n in gm.graph.nodes if n.target == "add")
    assert next(reversed(add.meta["nn_module_stack"].values()))[0] == "gate"


def test_run_capture_pins_data_dependent_ops_by_name_and_path():
    model, x = _model()
    cg = analyze(fxslim.trace(model, x, capture="run"))
    pinned = {g.root.target: g.reason for g in cg.groups if not g.prunable}
    assert "nonzero" in pinned["head.weight"] or "gt" in pinned["head.weight"]
    assert "<top level>" in pinned["head.weight"]
    prunable = {g.root.target for g in cg.groups if g.prunable}
    # the gate's residual joins the stem's group
    assert {"stem.0.weight", "proj.weight"} <= prunable


def test_run_capture_prune_is_the_users_class_and_proven(tmp_path):
    model, x = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fxslim.trace(model, x, capture="run", share_weights=True)
    cg = analyze(gm)
    removal = random_removal(cg, np.random.default_rng(0))
    diff, pruned, plan = dead_channel_check(gm, cg, removal, x)  # both sides: Picker, run eagerly
    assert isinstance(pruned, Picker) and diff <= RTOL + ATOL, diff
    assert slicing_mismatches(gm, pruned, plan) == []

    plan = make_plan(cg, uniform_removal(gm, cg, 0.5, ["head"]))
    small = apply_plan(gm, cg, plan, x)
    assert isinstance(small, Picker)
    assert (
        small.stem[0].out_channels == 8
        and small.gate.bn.num_features == 8
        and small.proj.out_channels == 12
    )
    assert small.head.in_channels == 12 and small.head.out_channels == 5
    assert slicing_mismatches(gm, small, plan) == []
    assert (
        small.fxslim_meta["fxslim_history"] and "proj.weight:0" in small.fxslim_meta["fxslim_keep"]
    )
    # the user's model untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        out = small([torch.randn(3, 20, 16)])  # its own class: any size runs
    assert out[0]["width_profile"].shape == (16,)
    fxslim.save(small, tmp_path / "small")  # oracle 4: the history replays through a run capture
    loaded = fxslim.load(tmp_path / "small", Picker().eval())
    with torch.no_grad():
        assert type(loaded) is Picker and torch.equal(
            loaded(*x)[1]["width_profile"], small(*x)[1]["width_profile"]
        )
    again = fxslim.prune(small, x, ratio=0.5, ignore=["head"], capture="run")  # prunes again
    assert isinstance(again, Picker) and again.proj.out_channels == 6
    assert len(again.fxslim_meta["fxslim_history"]) == 2


class Writer(nn.Module):
    """Writes into its features in place: the write has no rule, so what it touches is pinned."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        y[:, 0] = 0.0  # __setitem__
        rows = [r.sum() for r in self.b(y)]  # iterating a tensor: its unbind(0)
        return torch.stack(rows)


def test_in_place_writes_pin_and_iteration_is_recorded():
    torch.manual_seed(0)
    gm = fxslim.trace(Writer().eval(), torch.randn(2, 3, 4, 4), capture="run")
    assert any(n.target == "__setitem__" for n in gm.graph.nodes)
    assert any(n.target == "unbind" for n in gm.graph.nodes)
    groups = {g.root.target: g for g in analyze(gm).groups}
    assert not groups["a.weight"].prunable and "__setitem__" in groups["a.weight"].reason


def test_a_forward_that_fails_is_a_trace_error():
    class Broken(nn.Module):
        def forward(self, x):
            return x @ torch.ones(5, 5)

    with pytest.raises(TraceError, match="fails on the example inputs"):
        fxslim.trace(Broken(), torch.randn(2, 3), capture="run")


class Skipped(nn.Module):
    """A block the example's run does not take: its conv is coupled to nothing recorded."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.stem(x)
        if y.sum() > 1e9:  # never on the example
            y = self.block(y)
        return y.amax(dim=1)


def test_a_branch_not_taken_is_named_and_refused():
    torch.manual_seed(0)
    model, x = Skipped().eval(), torch.randn(1, 3, 4, 4)
    gm = fxslim.trace(model, x, capture="run")
    assert gm.meta["run_capture_unused"] == ["block.weight", "block.bias"]
    with pytest.raises(TraceError, match=r"never read 2 parameters \(\['block.weight'"):
        fxslim.prune(model, x, ratio=0.5, capture="run")


def test_a_users_hook_is_recorded_not_hidden_in_a_leaf():
    """A forward hook that reverses a conv's channels: its flip has no rule, so the conv's
    channels are pinned (a leaf would have hidden the flip and coupled them as they were)."""
    torch.manual_seed(0)
    model, x = Writer().eval(), torch.randn(2, 3, 4, 4)
    assert analyze(fxslim.trace(model, x, capture="run")).group_of("b.weight", 0).prunable
    model.b.register_forward_hook(lambda m, a, out: out.flip(1))
    gm = fxslim.trace(model, x, capture="run")
    assert any(n.target == "flip" for n in gm.graph.nodes)
    out = analyze(gm).group_of("b.weight", 0)
    assert not out.prunable and "flip" in out.reason and "'b'" in out.reason
    assert (
        not model.b._forward_pre_hooks and len(model.b._forward_hooks) == 1
    )  # the user's hooks as they were
