"""Shared oracle helpers for the tests."""

from __future__ import annotations

import numpy as np
import torch

import fxslim
from fxslim._inputs import as_inputs
from fxslim.passes.prune import apply_plan, make_plan
from fxslim.passes.verify import dead_channel_check, slicing_mismatches

RTOL, ATOL = 1e-4, 1e-5


def random_removal(cg, rng, share=0.3, stat_ok=False):
    removal = {}
    for grp in cg.groups:
        if not grp.prunable or (grp.stat and not stat_ok):
            continue
        n = max(1, min(grp.size - 1, round(share * grp.size)))
        removal[grp.id] = sorted(rng.choice(grp.size, size=n, replace=False).tolist())
    return removal


def check_oracles(model, x, seed=0, expect_prunable=1):
    """Both oracles on every prunable group; returns (gm, cg, pruned) for structural checks."""
    model.eval()
    gm = fxslim.trace(model, x)
    cg = fxslim.analyze(gm)
    prunable = [g for g in cg.groups if g.prunable]
    assert len(prunable) >= expect_prunable, [str(g) for g in cg.groups]
    rng = np.random.default_rng(seed)
    removal = random_removal(cg, rng)
    pruned = None
    if removal:
        diff, pruned, plan = dead_channel_check(gm, cg, removal, x)
        assert diff <= ATOL + RTOL, f"dead-channel outputs differ by {diff:.3e} (scaled)"
        assert slicing_mismatches(gm, pruned, plan) == []
        pruned.graph.lint()
        if gm.meta["fxslim_capture"]["kind"] == "fx":  # an export capture is specialised to x's shapes
            _runs_on_other_batch(pruned, x)
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())
    stat = random_removal(cg, rng, stat_ok=True)
    stat = {k: v for k, v in stat.items() if cg.groups[k].stat}
    if stat:  # statistic groups: slicing consistency + shapes + forward
        plan = make_plan(cg, stat)
        p2 = apply_plan(gm, cg, plan, x)
        assert slicing_mismatches(gm, p2, plan) == []
        with torch.inference_mode():
            assert _shapes(as_inputs(x).call(p2)) == _shapes(as_inputs(x).call(gm))
    return gm, cg, pruned


def _shapes(out):
    if isinstance(out, torch.Tensor):
        return out.shape
    if isinstance(out, dict):  # a transformers ModelOutput
        return {k: _shapes(v) for k, v in out.items()}
    return [_shapes(o) for o in out]


def _runs_on_other_batch(model, x):
    """Sizes left in the graph must stay symbolic in the batch dim."""
    if isinstance(x, torch.Tensor) and x.shape[0] > 1:
        with torch.inference_mode():
            model(x[:1])
            model(torch.cat([x, x[:1]]))
