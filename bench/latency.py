"""CPU latency of original vs pruned models (2x and 4x fewer MACs), torch eager and onnxruntime.

For each model: uniform-ratio pruning bisected to 1/2 and 1/4 of the original MACs
(`fxslim.passes.policy.prune_to_macs`, widths rounded to multiples of 8), each variant exported to a verified ONNX file,
then median latency at batch 1 with threads pinned, all variants of a model measured in
one process, interleaved. "eff" is speed-up / MACs reduction (1.0 = the compute-bound limit).

    python -m bench.latency [model ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torchvision

import fxslim
from fxslim.passes.policy import prune_to_macs
from fxslim.runtime.measure import count_macs, measure_latency, onnx_latency

MODELS = {
    "resnet18": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1", "densenet121": "classifier",
    "efficientnet_b0": "classifier.1", "convnext_tiny": "classifier.2", "vit_b_16": "heads.head",
}
THREADS = 2


def rows_for(name: str, runs: int = 20) -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    variants = {"original": model}
    for target in (0.5, 0.25):
        variants[f"{round(1 / target)}x fewer MACs"], _ = prune_to_macs(
            model, x, target, ignore=[MODELS[name]], round_to=8
        )
    out = []
    with tempfile.TemporaryDirectory() as d:
        paths = {k: fxslim.export_onnx(m, x, Path(d) / f"{k[:2]}.onnx").path for k, m in variants.items()}
        macs = {k: count_macs(m, x) for k, m in variants.items()}
        lat = {k: measure_latency(m, x, runs=runs, threads=THREADS)["median_ms"] for k, m in variants.items()}
        ort = {k: onnx_latency(paths[k], x, threads=THREADS, runs=runs)["median_ms"] for k in variants}
    for k in variants:
        red = macs["original"] / macs[k]
        sp, so = lat["original"] / lat[k], ort["original"] / ort[k]
        out.append(
            f"| {name} | {k} | {macs[k] / 1e9:.2f} | {red:.2f}x | {lat[k]:.1f} | {sp:.2f}x | {sp / red:.2f} | "
            f"{ort[k]:.1f} | {so:.2f}x | {so / red:.2f} |"
        )
    return out


def table(names=tuple(MODELS)) -> str:
    rows = [
        "| model | variant | GMACs | MACs reduction | torch ms | torch speed-up | eff | onnxruntime ms | ort speed-up | eff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for r in rows_for(name):
            rows.append(r)
            print(r, file=sys.stderr, flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1:] or tuple(MODELS)))
