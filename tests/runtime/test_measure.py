"""Measurement plumbing: statistics and counts, never timing thresholds."""

from __future__ import annotations

import torch
from torch import nn

import fxslim
from fxslim.runtime.measure import (
    count_macs,
    count_params,
    measure_latency,
    peak_memory_bytes,
    throughput,
)


def test_latency_statistics_and_call_counts():
    calls = []
    stats = measure_latency(lambda: calls.append(1), warmup=3, runs=11)
    assert len(calls) == 14
    assert stats["runs"] == 11 and 0 <= stats["median_ms"] <= stats["p90_ms"]


def test_latency_pins_and_restores_threads():
    seen = []
    old = torch.get_num_threads()
    measure_latency(lambda: seen.append(torch.get_num_threads()), warmup=0, runs=2, threads=1)
    assert seen == [1, 1] and torch.get_num_threads() == old


def test_macs_and_params_hand_computed():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    assert count_params(model) == 10 * 20 + 20 + 20 * 5 + 5
    assert count_macs(model, torch.randn(3, 10)) == 3 * (10 * 20 + 20 * 5)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    assert count_macs(conv, torch.randn(1, 4, 5, 5)) == 8 * 4 * 9 * 25



class _ClassToken(nn.Module):
    """CaiT's shape: a view of a parameter (cls_token.expand) enters a child module."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.cls_token.expand(x.shape[0], -1, -1)) + x.sum()


def test_macs_of_a_parameter_view_entering_a_module():
    # under inference mode that view requires grad without a grad_fn, and the flop
    # counter's module tracker raised a raw AttributeError ('next_functions')
    assert count_macs(_ClassToken(), torch.randn(3, 5)) == 3 * 8 * 4

def test_throughput_and_memory_plumbing():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    tp = throughput(model, lambda bs: torch.randn(bs, 64), (1, 4), runs=3)
    assert set(tp) == {1, 4} and all(v > 0 for v in tp.values())
    small, big = peak_memory_bytes(model, torch.randn(1, 64)), peak_memory_bytes(model, torch.randn(512, 64))
    assert big > small >= 0  # activations grow with the batch (512 x 256 floats >= 512 KB)
    assert big >= 512 * 256 * 4


def test_compare_table_has_a_row_per_model(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    small = fxslim.prune(model, x, 0.5)
    paths = {}
    for label, m in (("original", model), ("pruned", small)):
        paths[label] = fxslim.export_onnx(m, x, tmp_path / f"{label}.onnx").path
    table = fxslim.compare({"original": model, "pruned": small}, x, runs=3, onnx=paths)
    lines = table.splitlines()
    assert len(lines) == 4 and "onnxruntime ms" in lines[0]
    assert lines[2].startswith("| original |") and "1.00x" in lines[2]
