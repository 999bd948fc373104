"""Latency target: asked vs measured, torch eager, batch 1, 2 threads.

`fxslim.prune(..., target_latency=t)` searches with its own timings; the result is then
timed again independently and compared with t x the original: 7 rounds, each timing the
original and the pruned model back to back (20 runs each); the ratio is the median of the
per-round ratios (sequential medians drift by 5-10% on this machine).

    python -m bench.latency_target [model ...]
"""

from __future__ import annotations

import statistics
import sys

import torch
import torchvision

import fxslim
from fxslim.runtime.measure import count_macs, measure_latency

MODELS = {"resnet18": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1"}


def paired(a, b, x, rounds: int = 7, runs: int = 20) -> tuple[float, float, float]:
    """(median ms of a, median ms of b, median over rounds of b/a timed back to back)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(measure_latency(a, x, threads=2, runs=runs)["median_ms"])
        tb.append(measure_latency(b, x, threads=2, runs=runs)["median_ms"])
    ratio = statistics.median(v / u for u, v in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb), ratio


def table(names=tuple(MODELS), target: float = 0.5) -> str:
    torch.set_num_threads(2)
    rows = ["| model | asked | original ms | pruned ms | measured / original | MACs kept | within 10% |",
            "|---|---|---|---|---|---|---|"]
    for name in names:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        x = torch.randn(1, 3, 224, 224)
        small = fxslim.prune(model, x, target_latency=target, ignore=[MODELS[name]], round_to=8,
                             latency_options={"threads": 2, "runs": 15})
        t0, t1, frac = paired(model, small, x)
        rows.append(f"| {name} | {target:.2f} | {t0:.1f} | {t1:.1f} | {frac:.3f} | "
                    f"{count_macs(small, x) / count_macs(model, x):.3f} | {'yes' if abs(frac - target) <= 0.1 * target else 'no'} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1:] or tuple(MODELS)))
