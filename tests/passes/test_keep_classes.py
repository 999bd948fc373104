"""The class-keeping rewrite: pruned models in the user's own classes, proven equal to the
rewritten graph, or the GraphModule with the reason."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torchvision
from torch import fx, nn

import fxslim
from fxslim.passes.distill import channel_map
from fxslim.passes.keep_classes import KeepClassesPass, keep_classes
from fxslim.passes.schedule import prune_iteratively
from fxslim.utils import fxslim_meta

RTOL, ATOL = 1e-5, 1e-6
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    """A small CNN with a method of its own and sizes read from its layers."""

    def __init__(self, hard_coded: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1), nn.ReLU())
        self.fc = nn.Linear(32 * 4 * 4, 5)
        self.hard_coded = hard_coded

    def features(self, x):
        return nn.functional.adaptive_avg_pool2d(self.body(self.stem(x)), 4)

    def forward(self, x):
        y = self.features(x)
        y = y.reshape(y.shape[0], 32 * 16) if self.hard_coded else y.flatten(1)
        return self.fc(y)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_resnet18_keeps_its_class_and_equals_the_graph():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fxslim.prune(model, x, 0.5, ignore=["fc"], keep_classes=False)
    small = keep_classes(model, gm, x)  # what prune's default does last (tests/passes/test_saveload.py runs it)
    assert type(small) is torchvision.models.ResNet and isinstance(gm, fx.GraphModule)
    assert small.layer1[0].conv1.out_channels == 32 == small.layer1[0].conv1.weight.shape[0]
    assert small.layer1[0].bn1.num_features == 32 and small.fc.in_features == small.fc.weight.shape[1] == 256
    assert model.layer1[0].conv1.out_channels == 64  # the user's model is untouched
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in gm.state_dict().items()}
    with torch.inference_mode():
        _close(small(x), gm(x))
        _close(small(x[:1]), gm(x[:1]))
    assert not small.training and set(fxslim_meta(small)) >= {"fxslim_source", "fxslim_history", "fxslim_keep"}


def test_attributes_modes_and_the_pass_contract():
    torch.manual_seed(0)
    model = Net().train()
    model.stem[0].weight.requires_grad_(False)
    gm = fxslim.prune(model, X, 0.5, keep_classes=False)
    res = KeepClassesPass(model, X)(gm)
    small = res.module
    assert res.modified and type(small) is Net and res.info["reason"] is None
    assert small.training and small.stem[1].training  # the mode is the user's (train: BN batch statistics)
    assert not small.stem[0].weight.requires_grad and small.body[1].weight.requires_grad
    conv = small.body[0]
    assert conv.groups == conv.in_channels == conv.out_channels == 8 == conv.weight.shape[0]
    assert small.body[1].in_channels == 8 and small.fc.in_features == small.body[1].out_channels * 16
    assert small.features(X).shape[1] == small.body[1].out_channels  # the model's own methods
    small.eval()
    gm.eval()
    with torch.inference_mode():
        _close(small(X), gm(X))
    # from a GraphModule there is no class to keep: the pass reports no change
    again = KeepClassesPass(gm, X)(gm)
    assert again.module is gm and not again.modified


def test_a_size_written_in_forward_falls_back_to_the_graph_with_the_reason(caplog):
    torch.manual_seed(0)
    model = Net(hard_coded=True).eval()
    with caplog.at_level(logging.WARNING, logger="fxslim.passes.keep_classes"):
        small = fxslim.prune(model, X, 0.5)
    assert isinstance(small, fx.GraphModule)
    reason = fxslim_meta(small)["fxslim_form_reason"]
    assert "own forward fails on the pruned sizes in '<top level>' (Net)" in reason
    assert "y = y.reshape(y.shape[0], 32 * 16) if self.hard_coded" in reason  # the user's line
    assert reason in caplog.text
    with torch.inference_mode():
        assert small(X).shape == (2, 5)


class Scaled(Net):
    """Divides by a size its forward reads from a layer: not a channel dim, so the graph keeps the literal."""

    def forward(self, x):
        return super().forward(x) / self.body[1].out_channels


def test_the_structural_proof_accepts_equal_graphs_and_catches_a_changed_size(caplog):
    from fxslim.passes._same_graph import graph_mismatch
    from fxslim.passes.keep_classes import rebuild_classes

    torch.manual_seed(0)
    model = Net().eval()
    gm = fxslim.prune(model, X, 0.5, keep_classes=False)
    kept = rebuild_classes(model, gm)
    assert graph_mismatch(kept, gm, {}) is None  # traced again: node for node the pruned graph
    assert graph_mismatch(kept, gm, None) == "traced with custom options"  # options unknown: run it instead
    kept.body[1].register_forward_hook(lambda *a: None)  # a hook the graph would not show
    assert graph_mismatch(kept, gm, {}) is not None

    # the forward divides by body[1].out_channels: the class-kept copy reads the synced (halved) size,
    # the pruned graph the literal 32 the oracles proved. Structurally different, and by running it too.
    model = Scaled().eval()
    gm = fxslim.prune(model, X, 0.5, keep_classes=False)
    why = graph_mismatch(rebuild_classes(model, gm), gm, {})
    assert why is not None and "truediv" in why and "32" in why
    with caplog.at_level(logging.WARNING, logger="fxslim.passes.keep_classes"):
        small = fxslim.prune(model, X, 0.5)
    assert isinstance(small, fx.GraphModule) and "output 0 differs from the pruned graph's" in caplog.text
    with torch.inference_mode():
        _close(small(X), gm(X))


def test_modules_the_forward_never_runs_fall_back():
    class Aux(Net):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(32, 5)  # run only in training, like GoogLeNet's auxiliary heads

    small = fxslim.prune(Aux().eval(), X, 0.5)
    assert isinstance(small, fx.GraphModule)
    assert "not used by the traced forward (e.g. 'aux.weight'" in small.meta["fxslim_form_reason"]


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def test_tied_weights_and_attention_sizes():
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    small = fxslim.prune(model, ids, 0.5)
    gm = fxslim.prune(model, ids, 0.5, keep_classes=False)
    assert type(small) is TiedLM
    assert small.head.weight is small.emb.weight  # still one tensor
    width = small.emb.weight.shape[1]
    assert width < 16 and small.emb.embedding_dim == width and small.attn.embed_dim == width
    assert small.attn.num_heads * small.attn.head_dim == width and small.up.in_features == width
    with torch.inference_mode():
        _close(small(ids), gm(ids))


def test_save_load_round_trip_keeps_the_form(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    for keep, cls in ((True, Net), (False, fx.GraphModule)):
        small = fxslim.prune(model, X, 0.5, keep_classes=keep)
        fxslim.save(small, tmp_path / str(keep))
        plan = json.loads((tmp_path / str(keep) / "plan.json").read_text())
        assert plan["form"] == ("module" if keep else "graph")
        fresh = Net()
        again = fxslim.load(tmp_path / str(keep), model=fresh)
        assert isinstance(again, cls) and fresh.fc.in_features == 512 and fresh.training
        with torch.inference_mode():
            assert torch.equal(again(X), small(X))
    assert again is not small


def test_iterative_pruning_and_feature_alignment(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    seen = []
    small = prune_iteratively(model, X, steps=2, target_params=0.5, callback=lambda m, k: seen.append(type(m)))
    assert seen == [Net, Net] and type(small) is Net
    assert len(fxslim_meta(small)["fxslim_history"]) == 2
    kept = channel_map(small, "body.1")  # student channel i is teacher channel kept[i], across both steps
    assert kept is not None and len(kept) == small.body[1].out_channels
    assert torch.equal(small.body[1].bias, model.body[1].bias[kept])
    again = fxslim.load(fxslim.save(small, tmp_path / "m"), model=Net())
    assert type(again) is Net and torch.equal(again(X), small(X))


def test_keep_classes_must_be_a_bool():
    with pytest.raises(fxslim.ArgumentError, match="keep_classes"):
        fxslim.prune(Net(), X, 0.5, keep_classes="yes")
    with pytest.raises(fxslim.ArgumentError, match="keep_classes"):
        fxslim.prune_channels(Net(), X, {"body.1": [0]}, keep_classes=1)


def test_prune_channels_keeps_classes():
    model = Net().eval()
    small = fxslim.prune_channels(model, X, {"body.1": [3, 7]})
    assert type(small) is Net and small.body[1].out_channels == 30 and small.fc.in_features == 30 * 16
    assert isinstance(keep_classes(model, fxslim.prune_channels(model, X, {"body.1": [3]}, keep_classes=False), X), Net)
