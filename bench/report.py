"""Regenerate bench/README.md: machine, versions, date, and every table.

    python -m bench.report            # ~75 minutes on 2 cores; run on a quiet machine
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch

from bench import (
    distill_defaults,
    distill_table,
    latency,
    latency_target,
    policy_compare,
    prune_speed,
)
from bench.gpu import (  # the GPU section is written by `python -m bench.gpu` and kept here
    BEGIN,
    END,
)
from fxslim.runtime.measure import cpu_info

OUT = Path(__file__).with_name("README.md")


def machine() -> str:
    cpu = cpu_info()[0]
    versions = [f"torch {torch.__version__}"]
    for mod in ("torchvision", "onnxruntime", "onnx", "onnxsim", "torch_pruning"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} (not installed)")
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; " + ", ".join(versions)
            + f"; {datetime.date.today().isoformat()}")


def main() -> None:
    speed = prune_speed.table()
    lat = latency.table()
    lt = latency_target.table()
    pc = policy_compare.table()
    dt = distill_table.table()
    old = OUT.read_text() if OUT.exists() else ""
    gpu = old[old.index(BEGIN):old.index(END) + len(END)] + "\n\n" if BEGIN in old and END in old else ""
    dd = distill_defaults.table()
    OUT.write_text(f"""# fxslim benchmarks

Regenerate everything here with `python -m bench.report` (a quiet machine, ~30 minutes on
2 cores). Machine: {machine()}.

The pytest-benchmark suite (`python -m pytest bench`) times the same passes and
latencies; CI runs it with `--benchmark-disable` so it cannot rot.

## Pass time: fxslim vs torch-pruning

trace + channel analysis + `prune(ratio=0.5)` (L1 magnitude, classifier head ignored),
against torch-pruning's `BasePruner` (which builds its `DependencyGraph`) + `step()` at
the same ratio, importance and ignored head. Input 1x3x224x224, random init, 2 threads,
median of 9 alternating runs in one process (`python -m bench.prune_speed`).

{speed}

## CPU latency: original vs pruned

Uniform pruning bisected to 1/2 and 1/4 of the original MACs, widths rounded to
multiples of 8 (`round_to=8`; without it onnxruntime's blocked kernels can make a pruned
model *slower*, see the notes below). Batch 1, 2 threads, medians; "eff" = speed-up /
MACs reduction, 1.0 being the compute-bound limit (`python -m bench.latency`).

{lat}

## Latency target

`fxslim.prune(model, x, target_latency=0.5, round_to=8)`: measured search (per-group
latency probes, then a bisection in which every candidate is timed next to a fresh timing
of the original); the result re-timed independently: 7 rounds of original and pruned
back to back, median of the per-round ratios (`python -m bench.latency_target`).

{lt}

## Policies at equal MACs: fxslim vs torch-pruning

`python -m bench.policy_compare`: at 2x and 3x fewer MACs, fxslim's latency-aware ranking
(`prune_to_latency(..., macs_target=...)`, widths rounded to 16), fxslim's uniform ratio
(`round_to=16`: one AVX-512 fp32 register, onnxruntime's NCHWc block on this CPU), and
torch-pruning's default (uniform ratio, L1, ratio bisected to the same MACs); on
mobilenet_v2 also the latency-aware search probed in onnxruntime. Speed-up over the
original, torch eager and onnxruntime, batch 1 (20 runs) and 32 (3 runs), 2 threads,
medians.

{pc}

## Accuracy recovery: distillation

`python -m bench.distill_table`: teachers trained to convergence, pruned to 0.5x / 0.25x
MACs, then recovered for the same epochs on the teacher's whole training set or on a
quarter / a tenth of it, every method with the learning rate `lr="auto"` chose for it
(listed, with how many seeds chose each); test accuracy, mean ± standard deviation over
{len(distill_table.SEEDS)} seeds, and the mean per-seed difference to label-only
fine-tuning ± its standard error.

{dt}

`python -m bench.distill_defaults`: `fxslim.distill(student, teacher, train, val,
epochs=E)` with nothing else set, against a plain Adam loop (constant lr 1e-3, labels
only, last epoch kept), same pruned start and same batches per seed; mean per-seed
difference ± standard error.

{dd}

{gpu}## Notes

- Widths matter more than MACs on the CPU. mobilenet_v2 pruned to 1/2 of its MACs
  *without* `round_to` ran in 6.4 ms in onnxruntime against 3.5 ms for the original
  (odd channel counts fall off the blocked NCHWc kernels); with `round_to=8`, 2.3 ms.
  The latency-target search therefore rounds widths and measures instead of modelling.
- Pass times are sensitive to load: measured while other jobs ran, torch-pruning took
  1.7 s on resnet18 (fxslim 0.44 s); on the quiet machine above, 0.13 s vs 0.11 s.

- ONNX export over the whole zoo: `bench/EXPORT_ZOO.md` (`python -m bench.export_zoo`).
- Channel groups, pins and MACs at ratio 0.5 for every zoo model: `bench/ZOO.md`
  (`python -m bench.zoo_table`).
- Digits at 0.25x MACs over five stratified splits, label-only vs logit KD:
  `python -m bench.distill_splits` (~6 minutes; table in the distillation findings).
""")


if __name__ == "__main__":
    main()
