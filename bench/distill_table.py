"""Accuracy recovery after pruning: digits (ResNet-style 2-D CNN) and MNIST-1D (1-D CNN).

Each teacher is pruned to 0.5x and 0.25x of its MACs (uniform L1, exact MACs target);
then, for the same epochs: no recovery, fine-tune with labels only, logit KD, logit +
channel-aligned feature KD, and logit KD into a from-scratch thin student of the same
MACs. Test accuracy, mean and spread over 3 seeds (best validation epoch restored).

    python -m bench.distill_table            # ~15 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import sys

import torch
from torch.utils.data import DataLoader, Subset

import fxslim
from fxslim.passes.distill import distill, thin_copy
from fxslim.runtime.examples import (
    MNIST1DCNN,
    DigitsResNet,
    accuracy,
    digits_splits,
    fit,
    mnist1d_loaders,
)

EPOCHS = 6
SEEDS = (0, 1, 2)


def datasets():
    tr, va, te = digits_splits(seed=0)
    yield "digits", DigitsResNet(width=64), tr, va, te, torch.randn(1, 1, 8, 8), ["block2.0", "block4.0"], 8
    tr, te = mnist1d_loaders(seed=0)
    n = len(tr.dataset)
    val = DataLoader(Subset(tr.dataset, range(n - 500, n)), batch_size=512)
    train = DataLoader(Subset(tr.dataset, range(n - 500)), batch_size=128, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    yield "MNIST-1D", MNIST1DCNN(width=64), train, val, te, torch.randn(1, 1, 40), ["features.3", "features.9"], 12


def run(name, teacher, train, val, test, x, feats, t_epochs) -> list[str]:
    torch.manual_seed(0)
    teacher = fit(teacher, train, epochs=t_epochs, seed=0)
    t_acc = accuracy(teacher, test)
    rows = [f"| {name} | teacher | 1.00 | {t_acc * 100:.1f} | - |"]
    head = "fc"
    for budget in (0.5, 0.25):
        res: dict[str, list[float]] = {}
        for seed in SEEDS:
            small = fxslim.prune(teacher, x, target_macs=budget, ignore=[head])
            res.setdefault("no recovery", []).append(accuracy(small, test))
            kw = dict(epochs=EPOCHS, lr=2e-3, progress=False, seed=seed)
            runs = {
                "fine-tune (labels only)": dict(alpha=0.0),
                "logit KD": dict(alpha=0.9, temperature=4.0),
                "logit + feature KD": dict(alpha=0.9, temperature=4.0, features=feats, feature_weight=1.0),
            }
            for label, extra in runs.items():
                student = fxslim.prune(teacher, x, target_macs=budget, ignore=[head])
                out = distill(student, teacher, train, val, **kw, **extra).student
                res.setdefault(label, []).append(accuracy(out, test))
            ratio = fxslim.prune(teacher, x, target_macs=budget, ignore=[head], dry_run=True).ratio
            thin = thin_copy(teacher, x, ratio, ignore=[head])
            out = distill(thin, teacher, train, val, **kw, alpha=0.9, temperature=4.0).student
            res.setdefault("KD into thin student (scratch)", []).append(accuracy(out, test))
        macs = fxslim.count_macs(fxslim.prune(teacher, x, target_macs=budget, ignore=[head]), x) / fxslim.count_macs(teacher, x)
        for label, accs in res.items():
            mean = statistics.mean(accs) * 100
            sd = statistics.pstdev(accs) * 100
            rows.append(f"| {name} | {label} | {macs:.2f} | {mean:.1f} ± {sd:.1f} | {mean - t_acc * 100:+.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def table() -> str:
    torch.set_num_threads(2)
    rows = [f"| data | method ({EPOCHS} epochs) | MACs kept | test accuracy % (3 seeds) | vs teacher |",
            "|---|---|---|---|---|"]
    for args in datasets():
        rows += run(*args)
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
