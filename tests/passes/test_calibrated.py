"""Activation-aware importance (Wanda, FLAP): exact formulas on a small MLP, and on a
tiny Llama with planted outlier features, the ranking a removal oracle confirms and
`fxslim.prune` keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxslim
from fxslim.passes.calibrated import FLAPImportance, LMTaylorImportance, WandaImportance
from fxslim.passes.importance import MagnitudeImportance
from fxslim.passes.policy import Policy, allocate, score_groups
from fxslim.passes.prune import make_plan


def test_wanda_and_flap_equal_their_formulas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    data = [torch.randn(5, 6) for _ in range(3)]
    gm = fxslim.trace(model, data[0], share_weights=True)
    grp = fxslim.analyze(gm).group_of("0.weight", 0)
    x = torch.cat(data).double()
    w1, b1, w2 = (t.detach().double() for t in (model[0].weight, model[0].bias, model[2].weight))
    h = torch.relu(x @ w1.T + b1)  # what the second layer reads
    consumer = h.norm(dim=0) * w2.abs().sum(0)  # ||X_j|| * sum_i |W_ij| on the consumer columns
    producer = (w1.abs() * x.norm(dim=0)).sum(1)  # sum_k |W_jk| ||X_k|| on the producer rows
    flap = h.var(dim=0, unbiased=False) * (w2 ** 2).sum(0)
    pairs = [(b, torch.zeros(len(b), dtype=torch.long)) for b in data]  # (inputs, labels) batches read the same
    cases = [(WandaImportance(data, normalize=None), consumer), (WandaImportance(pairs, normalize=None), consumer),
             (WandaImportance(data, roles=("in", "out"), normalize=None), consumer + producer),
             (FLAPImportance(data, normalize=None), flap)]
    for imp, want in cases:
        imp.calibrate(model)
        np.testing.assert_allclose(imp(gm, grp), want.numpy(), rtol=1e-6)  # float32 forward
    # the first two batches only: other statistics, other scores
    two = WandaImportance(data, batches=2, normalize=None)
    two.calibrate(model)
    assert not np.allclose(two(gm, grp), consumer.numpy())


OUTLIERS = [0, 1]  # hidden features the norms scale by 20 (outlier features)
PLANTED_MLP = [0, 1, 2, 3]  # MLP channels whose gate/up rows read the outliers
HIDDEN, INTER, HEAD_DIM = 32, 32, 8


def _rows(n: int, big_at: list[int], g: torch.Generator) -> torch.Tensor:
    """`n` rows, each the same vector rolled so its one large entry (1.0) sits at
    `big_at[r]`: every row has the same magnitudes, only where it reads differs."""
    base = (0.01 + 0.04 * torch.rand(HIDDEN, generator=g)) * torch.sign(torch.randn(HIDDEN, generator=g))
    base[0] = 1.0
    return torch.stack([torch.roll(base, big_at[r]) for r in range(n)])


def _planted_llama():
    from fxslim.runtime.text import tiny_llama

    model = tiny_llama(hidden=HIDDEN, layers=1, heads=4, kv_heads=2, intermediate=INTER, seq_len=16)
    g = torch.Generator().manual_seed(0)
    quiet = [2 + i % (HIDDEN - 2) for i in range(INTER)]  # large entries off the outliers
    layer = model.model.layers[0]
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.fill_(1.0)
            norm.weight[OUTLIERS] = 20.0
        big = [OUTLIERS[i % 2] if i in PLANTED_MLP else quiet[i] for i in range(INTER)]
        layer.mlp.gate_proj.weight.copy_(_rows(INTER, big, g))
        layer.mlp.up_proj.weight.copy_(_rows(INTER, big, g))
        layer.mlp.down_proj.weight.copy_(_rows(INTER, list(range(INTER)), g).T)  # columns: same magnitudes
        # key/value head 0 (with query heads 0, 1) reads the outliers through v_proj
        layer.self_attn.v_proj.weight.copy_(_rows(2 * HEAD_DIM, [OUTLIERS[r % 2] if r < HEAD_DIM else quiet[r]
                                                                 for r in range(2 * HEAD_DIM)], g))
        layer.self_attn.q_proj.weight.copy_(_rows(4 * HEAD_DIM, quiet, g))
        layer.self_attn.k_proj.weight.copy_(_rows(2 * HEAD_DIM, quiet, g))
        layer.self_attn.o_proj.weight.copy_(_rows(4 * HEAD_DIM, list(range(4 * HEAD_DIM)), g).T)
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": (ids := torch.randint(0, 256, (4, 16), generator=g)), "labels": ids} for _ in range(2)]
    return model, calib


@torch.no_grad()
def _removal_effect(model, calib, weight: torch.Tensor, units: list[list[int]]) -> np.ndarray:
    """Oracle: how far the logits move when each unit's consumer columns of `weight` are zeroed."""
    ref = [model(input_ids=b["input_ids"]).logits for b in calib]
    out = []
    for cols in units:
        saved = weight[:, cols].clone()
        weight[:, cols] = 0
        out.append(sum(float((model(input_ids=b["input_ids"]).logits - r).norm()) for b, r in zip(calib, ref)))
        weight[:, cols] = saved
    return np.array(out)


def test_planted_outliers_ranked_and_kept():
    model, calib = _planted_llama()
    x = {"input_ids": calib[0]["input_ids"]}
    gm = fxslim.trace(model, x, share_weights=True)
    cg = fxslim.analyze(gm)
    mlp = cg.group_of("model.layers.0.mlp.down_proj.weight", 1)
    heads = cg.group_of("model.layers.0.self_attn.o_proj.weight", 1)
    hidden = cg.group_of("model.embed_tokens.weight", 1)
    wanda = WandaImportance(calib)
    wanda.calibrate(model)
    layer = model.model.layers[0]
    # MLP: Wanda's top channels are the planted ones, and removing them moves the logits most
    s = wanda(gm, mlp)
    assert set(np.argsort(-s)[:4]) == set(PLANTED_MLP), s
    effect = _removal_effect(model, calib, layer.mlp.down_proj.weight, [[j] for j in range(INTER)])
    assert set(np.argsort(-effect)[:4]) == set(PLANTED_MLP), effect
    # heads: key/value head 0 (o_proj columns of query heads 0 and 1) over head 1
    s = wanda(gm, heads)
    assert s[0] > 2 * s[1], s
    effect = _removal_effect(model, calib, layer.self_attn.o_proj.weight,
                             [list(range(2 * HEAD_DIM)), list(range(2 * HEAD_DIM, 4 * HEAD_DIM))])
    assert effect[0] > effect[1], effect
    # hidden size: the outlier features rank first
    assert set(np.argsort(-wanda(gm, hidden))[:2]) == set(OUTLIERS)
    # magnitude cannot see any of it: every MLP channel and head has the same magnitudes
    for grp in (mlp, heads):
        m = MagnitudeImportance(p=1)(gm, grp)
        assert np.ptp(m) < 1e-5 * np.abs(m).mean(), m

    # first-order Taylor on the model's own loss: |sum_unit w * dL/dw| per member, summed
    wg = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in calib:
        loss = model(**b).loss
        for (n, p), g in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            wg[n] += p.detach() * g
    mlp_w = "model.layers.0.mlp.{}.weight"
    want = sum(wg[mlp_w.format(k)].sum(1).abs() for k in ("gate_proj", "up_proj")) + wg[mlp_w.format("down_proj")].sum(0).abs()
    taylor = LMTaylorImportance(calib, normalize=None)
    taylor.calibrate(model)
    np.testing.assert_allclose(taylor(gm, mlp), want.double().numpy(), rtol=1e-5)
    with pytest.raises(fxslim.ArgumentError, match="labels"):
        LMTaylorImportance([{"input_ids": b["input_ids"]} for b in calib]).calibrate(model)

    # the plan fxslim.prune makes (its own steps, on the capture above), then the prune itself
    plan = make_plan(cg, allocate(cg, score_groups(gm, cg, wanda, ()), Policy(ratio=0.5)))
    assert set(PLANTED_MLP) <= set(plan.keep[("model.layers.0.mlp.down_proj.weight", 1)])
    assert plan.removed[heads.id] == [1]
    kept_hidden = plan.keep[("model.layers.0.mlp.down_proj.weight", 0)]
    assert set(OUTLIERS) <= set(kept_hidden)
    small = fxslim.prune(model, x, ratio=0.5, importance=WandaImportance(calib))
    assert type(small) is type(model)
    up = small.model.layers[0].mlp.up_proj.weight
    want = layer.mlp.up_proj.weight[plan.keep[("model.layers.0.mlp.up_proj.weight", 0)]][:, kept_hidden]
    assert torch.equal(up, want)
    v = small.model.layers[0].self_attn.v_proj.weight
    assert torch.equal(v, layer.self_attn.v_proj.weight[:HEAD_DIM][:, kept_hidden])  # head 0 stays
    with torch.inference_mode():
        assert torch.isfinite(small(**x).logits).all()


def test_calibration_data_is_required():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(2, 4)
    for name in ("wanda", "flap"):
        with pytest.raises(fxslim.ArgumentError, match="calibration data"):
            fxslim.prune(model, x, importance=name)
    for bad in (None, "text", 3):
        with pytest.raises(fxslim.ArgumentError, match="calibration data"):
            WandaImportance(bad)
    with pytest.raises(fxslim.ArgumentError, match="calibration data is empty"):
        fxslim.prune(model, x, importance=WandaImportance([]))
    with pytest.raises(fxslim.ArgumentError, match="roles"):
        FLAPImportance([x], roles=("norm",))
    with pytest.raises(fxslim.ArgumentError, match="no linear layer"):
        fxslim.prune(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)), torch.randn(1, 3, 8, 8),
                     importance=WandaImportance([torch.randn(1, 3, 8, 8)]))


def test_wanda_reads_transformers_conv1d():
    """GPT-2's Conv1D holds its weight as (in, out): the MLP channel j is row j of c_proj."""
    pytest.importorskip("transformers")
    from tests.hf.models import build

    model, x = build("gpt2")
    gm = fxslim.trace(model, x, share_weights=True)
    grp = fxslim.analyze(gm).group_of("transformer.h.0.mlp.c_proj.weight", 0)
    seen = {}
    c_proj = model.transformer.h[0].mlp.c_proj
    handle = c_proj.register_forward_pre_hook(lambda mod, a: seen.update(x=a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.inference_mode():
        model(**x)
    handle.remove()
    want = seen["x"].norm(dim=0) * c_proj.weight.detach().double().abs().sum(1)
    wanda = WandaImportance([x], normalize=None)
    wanda.calibrate(model)
    np.testing.assert_allclose(wanda(gm, grp), want.numpy(), rtol=1e-6)
