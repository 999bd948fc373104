"""Digits at 0.25x MACs over several stratified splits: teacher, label-only fine-tuning and
logit KD, paired seeds (same pruned start, same batches). The single split of
`bench.distill_table` cannot resolve differences under ~0.3 points (one test image is 0.28).

    python -m bench.distill_splits     # ~7 minutes
"""

from __future__ import annotations

import statistics

import torch

import fxslim
from bench.distill_table import _recovery, teacher_fit
from fxslim.passes.distill import distill
from fxslim.runtime.examples import DigitsResNet, accuracy, digits_splits

SPLITS, SEEDS = (1, 2, 3, 4, 5), range(6)


def main() -> None:
    torch.set_num_threads(2)
    x = torch.randn(1, 1, 8, 8)
    print("| split | teacher | label-only | logit KD | KD - label-only |\n|---|---|---|---|---|")
    teachers, diffs = [], []
    for split in SPLITS:
        train, val, test = digits_splits(seed=split)
        recover = _recovery(train.dataset, len(train.dataset), 64)  # batches paired by distill(seed=)
        torch.manual_seed(0)
        teacher = teacher_fit(DigitsResNet(width=64), train, 30)
        accs: dict[str, list[float]] = {"label": [], "kd": []}
        for seed in SEEDS:
            for key, extra in (("label", {"alpha": 0.0}), ("kd", {"alpha": 0.9, "temperature": 4.0})):
                small = fxslim.prune(teacher, x, target_macs=0.25, ignore=["fc"])
                out = distill(small, teacher, recover, val, epochs=6, lr=2e-3, progress=False, seed=seed, **extra)
                accs[key].append(accuracy(out.student, test) * 100)
        d = [k - lab for k, lab in zip(accs["kd"], accs["label"])]
        teachers.append(accuracy(teacher, test) * 100)
        diffs += d
        print(f"| {split} | {teachers[-1]:.2f} | {statistics.mean(accs['label']):.2f} | "
              f"{statistics.mean(accs['kd']):.2f} | {statistics.mean(d):+.2f} |", flush=True)
    print(f"\nKD - label-only over {len(diffs)} paired runs: {statistics.mean(diffs):+.2f} ± "
          f"{statistics.stdev(diffs) / len(diffs) ** 0.5:.2f} (s.e.); mean teacher {statistics.mean(teachers):.2f}")


if __name__ == "__main__":
    main()
