"""The torch.export capture: ATen ops translated into the rule table's forms, untranslated
ops pinned with a reason, the capture option, inputs in one form, fixed shapes."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxslim
from fxslim._inputs import ExampleInputs, as_inputs
from fxslim.graph.capture import ATEN_OPS, DROPPED
from tests.helpers import check_oracles

X = torch.randn(2, 3, 8, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(F.gelu(self.fc1(h)).view(h.shape[0], -1))


class Looped(nn.Module):
    """torch.fx cannot iterate a traced size; torch.export runs it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        rows = [self.fc1(x[i]) for i in range(x.shape[0])]
        return self.fc2(torch.relu(torch.stack(rows)))


def test_export_capture_translates_ops_and_passes_both_oracles():
    model = Net().eval()
    gm = fxslim.trace(model, X, capture="export")
    assert gm.meta["fxslim_capture"]["kind"] == "export"
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert {F.linear, F.conv2d, F.batch_norm, "relu_", "view", F.gelu} <= targets
    assert not any(isinstance(t, torch._ops.OpOverload) and t in ATEN_OPS for t in targets)
    assert not any(t in DROPPED for t in targets)
    with torch.inference_mode():
        torch.testing.assert_close(gm(X), model(X), rtol=1e-5, atol=1e-6)
    _, cg, pruned = check_oracles(gm, X, expect_prunable=2)
    assert cg.group_of("fc1.weight", 0).prunable and cg.group_of("conv.weight", 0).prunable
    assert pruned.get_parameter("fc1.weight").shape[0] < 12


def test_untranslated_aten_op_is_pinned_with_op_and_module_path():
    class Act(nn.Module):
        def forward(self, x):
            return torch.cos(x)  # aten.cos has no translation (and no rule): never guessed

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 6), Act(), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    gm = fxslim.trace(M().eval(), torch.randn(3, 4), capture="export")
    grp = fxslim.analyze(gm).groups
    mid = next(g for g in grp if any(m.target == "a.weight" and m.dim == 0 for m in g.members))
    assert not mid.prunable and "cos" in mid.reason and "'act'" in mid.reason
    assert gm.meta["fxslim_capture"]["aten_kept"] == {"aten.cos.default": 1}


def test_an_argument_off_its_default_keeps_the_aten_op():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

        def forward(self, x):
            return torch.add(self.a(x), self.b(x), alpha=2)

    gm = fxslim.trace(M().eval(), torch.randn(3, 4), capture="export")
    adds = [n for n in gm.graph.nodes if "add" in str(n.target)]
    assert len(adds) == 1 and adds[0].target is torch.ops.aten.add.Tensor  # alpha=2: not operator.add
    assert not any(g.prunable for g in fxslim.analyze(gm).groups if g.root and g.root.target == "a.weight")


def test_auto_falls_back_to_export_and_records_the_capture():
    model, x = Looped().eval(), torch.randn(2, 5, 6)
    with pytest.raises(fxslim.TraceError, match="torch.fx cannot trace"):
        fxslim.trace(model, x, capture="fx")
    gm = fxslim.trace(model, x)
    assert gm.meta["fxslim_capture"]["kind"] == "export"
    assert fxslim.trace(Net(), X).meta["fxslim_capture"]["kind"] == "fx"
    small = fxslim.prune(model, x, 0.5)  # the user's class: its own code runs any shape
    graph = fxslim.prune(model, x, 0.5, keep_classes=False)  # the export graph: only x's
    assert type(small) is Looped
    with torch.inference_mode():
        assert small(x).shape == graph(x).shape == (2, 5, 3)
        torch.testing.assert_close(small(x), graph(x))
        assert small(x[:1]).shape == (1, 5, 3)
        with pytest.raises(fxslim.TraceError, match="captured by torch.export"):
            graph(x[:1])


def test_capture_option_is_checked():
    with pytest.raises(fxslim.ArgumentError, match="capture"):
        fxslim.trace(Net(), X, capture="jit")
    with pytest.raises(fxslim.ArgumentError, match="capture='fx' only"):
        fxslim.trace(Net(), X, capture="export", leaf_paths=["fc1"])
    with pytest.raises(fxslim.ArgumentError, match="capture"):
        fxslim.prune(Net(), X, 0.5, capture="nope")


def test_inputs_take_one_form():
    t = torch.ones(2)
    assert as_inputs(t) == ExampleInputs((t,), {})
    assert as_inputs([t, t]).args == (t, t)
    batch = {"input_ids": t}
    one = as_inputs(batch)
    assert one.kwargs == batch and as_inputs(one) is one
    with pytest.raises(fxslim.TraceError, match="strings"):
        as_inputs({1: t})


def test_keyword_inputs_reach_an_fx_trace_by_name():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x, gate):
            return self.fc(x) * gate

    x, gate = torch.randn(3, 4), torch.randn(3, 1)
    gm = fxslim.trace(Two().eval(), {"gate": gate, "x": x}, capture="fx")  # bound by name, not order
    assert [s["name"] for s in gm.meta["fxslim_inputs"]] == ["gate", "x"]
    assert operator.mul in {n.target for n in gm.graph.nodes}
    small = fxslim.prune(Two().eval(), {"gate": gate, "x": x}, 0.5, capture="fx")
    assert small.fc.out_features == 6  # the output is pinned; the keyword inputs were bound right


def test_sdpa_with_enable_gqa_prunes_key_value_heads_with_their_query_heads():
    class GQA(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 16)

        def forward(self, x):
            b, t, _ = x.shape
            q = self.q(x).view(b, t, 4, 4).transpose(1, 2)  # 4 query heads
            k = self.k(x).view(b, t, 2, 4).transpose(1, 2)  # 2 key/value heads
            v = self.v(x).view(b, t, 2, 4).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return self.o(a.transpose(1, 2).reshape(b, t, 16))

    x = torch.randn(2, 5, 16)
    _, cg, pruned = check_oracles(GQA().eval(), x)
    heads = cg.group_of("k.weight", 0)
    assert heads.prunable and heads.size == 2  # query heads 2h, 2h+1 read key/value head h
    assert cg.group_of("q.weight", 0) is heads and cg.group_of("o.weight", 1) is heads
    assert pruned.get_parameter("q.weight").shape[0] == 8 and pruned.get_parameter("k.weight").shape[0] == 4


def test_export_records_the_eval_forward_and_leaves_the_model_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    x = torch.randn(3, 4)
    gm = fxslim.trace(model, x, capture="export")
    assert model.training and all(m.training for m in model.modules())
    drop = next(n for n in gm.graph.nodes if n.target is F.dropout)
    assert drop.args[2] is False  # a literal in the graph: the eval forward
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), model.eval()(x))
