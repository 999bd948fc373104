"""`fxslim.distill` with its defaults against the loop a user writes first: Adam at a
constant lr 1e-3, labels only, the same epochs and the same batches, the last epoch kept.

The teachers and data of `bench.distill_table` (digits and MNIST-1D, the whole training
set), pruned to 0.5x and 0.25x MACs; 6 and 15 epochs. Per seed both start from the same
pruned model and see the same batches (the recovery loader shuffles from the generator
`distill(seed=)` seeds, and `distill` re-seeds after its lr trials). Test accuracy; the
mean of the per-seed differences (distill - Adam loop) ± its standard error; the learning
rates `lr="auto"` chose; how many runs warned that they were cut short.

    python -m bench.distill_defaults        # ~25 minutes on 2 quiet cores
"""

from __future__ import annotations

import collections
import statistics
import sys

import torch
import torch.nn.functional as F

import fxslim
from bench.distill_table import datasets, teacher_for
from fxslim.passes.distill import distill
from fxslim.runtime.examples import accuracy

SEEDS = tuple(range(5))
EPOCHS = (6, 15)
NAMES = ("digits", "MNIST-1D")


def adam_loop(model: torch.nn.Module, data, epochs: int, seed: int) -> torch.nn.Module:
    """The 10-line fine-tune: Adam, constant lr 1e-3, cross-entropy, last epoch kept."""
    torch.manual_seed(seed)  # the same batches as distill(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def rows_for(name, make, train, recover, val, test, x, t_epochs) -> list[str]:
    teacher = teacher_for(make, train, t_epochs)  # bench.distill_table's
    rows = []
    for budget in (0.5, 0.25):
        for epochs in EPOCHS:
            ours, plain, lrs, warned = [], [], [], 0
            for seed in SEEDS:
                res = distill(fxslim.prune(teacher, x, target_macs=budget, ignore=["fc"]), teacher, recover, val,
                              epochs=epochs, seed=seed, progress=False)
                ours.append(accuracy(res.student, test) * 100)
                lrs.append(res.lr)
                warned += bool(res.warnings)
                base = adam_loop(fxslim.prune(teacher, x, target_macs=budget, ignore=["fc"]), recover, epochs, seed)
                plain.append(accuracy(base, test) * 100)
            diff = [a - b for a, b in zip(ours, plain)]
            chosen = ", ".join(f"{lr:.0e}" + (f" x{n}" if n > 1 else "")
                               for lr, n in sorted(collections.Counter(lrs).items()))
            rows.append(f"| {name} | {budget:.2f} | {epochs} | {statistics.mean(plain):.2f} | "
                        f"{statistics.mean(ours):.2f} | {statistics.mean(diff):+.2f} ± "
                        f"{statistics.stdev(diff) / len(diff) ** 0.5:.2f} | {chosen} | {warned}/{len(SEEDS)} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def table() -> str:
    torch.set_num_threads(1)  # as bench.distill_table's recovery runs
    rows = [(f"| data | MACs kept | epochs | Adam loop, lr 1e-3 (% test, {len(SEEDS)} seeds) | `fxslim.distill` "
             "defaults | distill - Adam (± s.e.) | lr chosen | cut-short warnings |"),
            "|---|---|---|---|---|---|---|---|"]
    for name, make, train, recover, val, test, x, _feats, t_epochs, _epochs in datasets():
        if name in NAMES:
            rows += rows_for(name, make, train, recover, val, test, x, t_epochs)
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
