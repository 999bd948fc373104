"""The latency-target search, on a deterministic stand-in for the clock (no timing here:
bench/latency_target.py measures the real thing)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxslim
from fxslim.passes.latency import latency_of
from fxslim.runtime.measure import count_macs
from fxslim.utils import fxslim_meta


def test_search_reaches_target_under_a_deterministic_clock():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)

    # stand-in clock: layer4 is "free" (a memory-bound layer buys nothing), the rest costs MACs
    def fake_ms(m):
        base = count_macs(m, x)
        l4 = sum(p.numel() for n, p in m.named_parameters() if n.startswith("layer4"))
        return base / 1e6 + l4 / 1e7

    small = fxslim.prune(model, x, target_latency=0.5, ignore=["fc"],
                         latency_options={"measure": fake_ms, "tol": 0.03, "steps": 14})
    base, final = fxslim_meta(small)["fxslim_latency"]
    assert base == pytest.approx(fake_ms(fxslim.trace(model, x)))
    assert abs(final / base - 0.5) <= 0.03
    with torch.inference_mode():
        assert small(x).shape == (1, 1000)


def test_search_compares_side_by_side_under_a_drifting_clock():
    """The CPU gets 2% slower at every timing (thermal or other load): a search that
    timed the original once, at the start, would stop far from the target."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    calls = [0]

    def drifting_ms(m):
        calls[0] += 1
        return count_macs(m, x) / 1e6 * (1.02 ** calls[0])

    small = fxslim.prune(model, x, target_latency=0.5, ignore=["fc"],
                         latency_options={"measure": drifting_ms, "tol": 0.03, "steps": 14})
    ratio = count_macs(small, x) / count_macs(model, x)  # the drift-free truth
    assert abs(ratio - 0.5) <= 0.5 * 0.03 + 0.02  # tolerance + one step of drift


def test_unreachable_target_stops_where_latency_stops_falling(caplog):
    """Below half the MACs this clock barely moves (per-op overhead): a target of 0.25x
    cannot be met. The search must not strip the model to one channel per layer for a
    last 0.1% of time; it stops at the fewest units within `tol` of the lowest latency
    it measured, warns, and records the shortfall."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    full = count_macs(model, x)

    def flat_ms(m):
        macs = count_macs(m, x)
        return 0.5 * full / 1e6 + max(macs - 0.5 * full, 0) / 1e6 + 0.001 * macs / 1e6

    with caplog.at_level("WARNING", logger="fxslim.passes.latency"):
        small = fxslim.prune(model, x, target_latency=0.25, ignore=["fc"],
                             latency_options={"measure": flat_ms, "tol": 0.05, "steps": 10})
    meta = fxslim_meta(small)
    gap = meta["fxslim_latency_unreached"]
    assert gap["target"] == 0.25 and 0.49 < gap["floor"] < 0.52
    assert gap["reached"] <= gap["floor"] * 1.05
    # the most-pruned candidate the search timed kept well under 10% of the MACs; the
    # chosen one keeps what buys no time back
    assert count_macs(small, x) / full > 0.2
    assert "not reached" in caplog.text and "0.25x" in caplog.text
    with torch.inference_mode():
        assert small(x).shape == (1, 1000)

def test_latency_of_backends_run(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    assert latency_of(model, x, "torch", threads=1, runs=3) > 0
    assert latency_of(model, x, "onnxruntime", threads=1, runs=3) > 0
    with pytest.raises(fxslim.PlanMismatchError, match="backend"):
        latency_of(model, x, "tpu")
