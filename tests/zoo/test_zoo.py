"""The whole torchvision classification zoo through both oracles and prune(ratio=0.5).

Set FXSLIM_ZOO_REPORT=path to append one JSON line per model (groups, pins, MACs).
"""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch

import fxslim
from fxslim.passes.importance import l1_importance
from fxslim.passes.policy import Policy, plan_prune, uniform_removal
from fxslim.passes.prune import apply_plan, make_plan
from fxslim.passes.verify import dead_channel_check, max_scaled_diff, slicing_mismatches
from fxslim.runtime.measure import count_macs, count_params
from tests.zoo.zoo import ZOO, build, head_of, random_removal

RTOL, ATOL = 1e-4, 1e-5


@pytest.mark.zoo
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model(name, tmp_path):
    torch.set_num_threads(2)
    model, x = build(name, small_vit=True)  # CI time: the bench tables build ViTs at 224
    gm = fxslim.trace(model, x, share_weights=True)  # one copy of the weights less (regnet_y_128gf: 2.6 GB)
    cg = fxslim.analyze(gm)
    with torch.inference_mode():
        ref = model(x)
        assert max_scaled_diff(ref, gm(x)) == 0.0  # tracing itself changes nothing
    assert ref.abs().max() > 0, "a zero output would make the oracles vacuous"

    # oracle 2 (dead channels) on every stat-free prunable group at once, random channels
    removal = random_removal(cg, np.random.default_rng(0))
    if removal:
        diff, pruned, plan = dead_channel_check(gm, cg, removal, x)
        assert diff <= RTOL + ATOL, f"dead-channel equivalence broken: {diff:.3e}"
        assert slicing_mismatches(gm, pruned, plan) == []  # oracle 1
        del pruned

    # prune(ratio=0.5), classifier head ignored; oracle 1 covers the statistic groups too
    head = head_of(model)
    removal = uniform_removal(gm, cg, 0.5, [head])
    plan = make_plan(cg, removal)
    small = apply_plan(gm, cg, plan, x)
    small.graph.lint()
    assert slicing_mismatches(gm, small, plan) == []
    for gid, units in removal.items():  # no group ends empty
        assert len(units) < cg.groups[gid].size
    assert all(p.numel() > 0 for p in small.parameters())
    with torch.inference_mode():
        out = small(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    with torch.inference_mode():  # batch sizes stay symbolic in the rewritten graph
        assert small(x[:1]).shape[0] == 1
    macs0, macs1 = count_macs(model, x[:1]), count_macs(small, x[:1])
    assert macs1 < macs0

    # MACs or params target (exact cost model, bisected ratio), checked by real counts: each
    # kind on every other model (both kinds on all 80 cost CI minutes it does not have)
    for kind in (("macs", "params")[ZOO.index(name) % 2],):
        report = plan_prune(gm, cg, x[:1], Policy(ignore=[head]), l1_importance, **{f"target_{kind}": 0.5})
        tgt = apply_plan(gm, cg, report.plan, x)
        got = count_macs(tgt, x[:1]) / macs0 if kind == "macs" else count_params(tgt) / count_params(gm)
        if report.ratio < 0.97:  # else the target is out of reach (pinned groups): closest kept
            assert abs(got - 0.5) <= 0.01, (kind, got)
        del tgt

    # save -> load onto an instance with other weights is bit-identical; the model itself
    # serves as that instance (a deep copy would hold one more copy of the weights)
    fxslim.save(small, tmp_path / name)
    del small, gm
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    again = fxslim.load(tmp_path / name, model=model)
    with torch.inference_mode():
        assert torch.equal(again(x), out)
    del again

    report = os.environ.get("FXSLIM_ZOO_REPORT")
    if report:
        pins: dict[str, int] = {}
        for g in cg.groups:
            if not g.prunable:
                pins[g.reason] = pins.get(g.reason, 0) + 1
        line = {
            "model": name, "groups": len(cg.groups), "prunable": sum(g.prunable for g in cg.groups),
            "stat": sum(g.prunable and g.stat for g in cg.groups),
            "pinned": sum(not g.prunable for g in cg.groups), "macs": macs0, "macs_pruned": macs1,
            "dead_diff": float(diff) if removal else None, "pins": pins,
        }
        with open(report, "a") as f:
            f.write(json.dumps(line) + "\n")
    del model
    gc.collect()
