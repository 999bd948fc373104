"""At equal MACs (2x and 3x fewer): latency-aware vs uniform-ratio fxslim vs torch-pruning's
default (uniform ratio, L1 magnitude, its ratio bisected to the same MACs). Torch eager and
onnxruntime, batch 1 and 32, 2 threads, medians; speed-up over the original.

fxslim's widths are rounded to multiples of ROUND_TO = 16: one AVX-512 register of fp32,
the block onnxruntime's NCHWc kernels use on this CPU (8 suits AVX2 machines).

    python -m bench.policy_compare [model ...]
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

import fxslim
from fxslim.graph.analysis import analyze
from fxslim.graph.trace import trace
from fxslim.passes.importance import l1_importance
from fxslim.passes.latency import prune_to_latency
from fxslim.passes.policy import Policy, prune_to_macs
from fxslim.runtime.measure import count_macs, measure_latency, onnx_latency

ROUND_TO = 16
ORT_PROBED = {"mobilenet_v2"}  # also a latency-aware search probed in onnxruntime (~80 s a cut)
MODELS = {"resnet18": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1",
          "efficientnet_b0": "classifier.1", "convnext_tiny": "classifier.2"}


def tp_to_macs(model, x, head, target):
    import torch_pruning as tp

    base = count_macs(model, x)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(9):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        tp.pruner.BasePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=mid,
                             ignored_layers=[m.get_submodule(head)]).step()
        frac = count_macs(m, x) / base
        if best is None or abs(frac - target) < abs(best[1] - target):
            best = (m, frac)
        lo, hi = (mid, hi) if frac > target else (lo, mid)
    return best[0]


def rows_for(name: str, runs: int = 20, big_runs: int = 3) -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    x32 = torch.randn(32, 3, 224, 224)
    head = MODELS[name]
    out = []
    with tempfile.TemporaryDirectory() as d:
        def timings(m, tag):
            p = fxslim.export_onnx(m, x, Path(d) / f"{tag}.onnx", dynamic_batch=True).path
            return (measure_latency(m, x, threads=2, runs=runs)["median_ms"],
                    onnx_latency(p, x, threads=2, runs=runs)["median_ms"],
                    measure_latency(m, x32, threads=2, runs=big_runs, warmup=1)["median_ms"],
                    onnx_latency(p, x32, threads=2, runs=big_runs, warmup=1)["median_ms"])

        base = timings(model, "orig")
        m0 = count_macs(model, x)
        for target in (0.5, 1 / 3):
            gm = trace(model, x, share_weights=True)
            cg = analyze(gm)
            variants = {
                "fxslim latency-aware": prune_to_latency(
                    gm, cg, x, 0.5, Policy(round_to=ROUND_TO, ignore=[head]), l1_importance, threads=2, runs=10,
                    macs_target=target),
                "fxslim uniform": prune_to_macs(model, x, target, ignore=[head], round_to=ROUND_TO)[0],
                "torch-pruning default": tp_to_macs(model, x, head, target),
            }
            if name in ORT_PROBED:
                gm = trace(model, x, share_weights=True)
                variants["fxslim latency-aware, onnxruntime probes"] = prune_to_latency(
                    gm, analyze(gm), x, 0.5, Policy(round_to=ROUND_TO, ignore=[head]), l1_importance,
                    backend="onnxruntime", threads=2, runs=20, macs_target=target)
            for label, m in variants.items():
                speed = " | ".join(f"{b / t:.2f}x" for b, t in zip(base, timings(m, label[:6])))
                out.append(f"| {name} | {1 / target:.0f}x | {label} | {count_macs(m, x) / m0:.3f} | {speed} |")
                print(out[-1], file=sys.stderr, flush=True)
    return out


def table(names=tuple(MODELS)) -> str:
    rows = [("| model | MACs cut | method | MACs kept | torch, batch 1 | onnxruntime, batch 1 | "
             "torch, batch 32 | onnxruntime, batch 32 |"),
            "|---|---|---|---|---|---|---|---|"]
    for name in names:
        rows += rows_for(name)
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1:] or tuple(MODELS)))
