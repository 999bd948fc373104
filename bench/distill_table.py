"""Accuracy recovery after pruning: digits (ResNet-style 2-D CNN) and MNIST-1D (1-D CNN).

Each teacher is trained to convergence, then pruned to 0.5x and 0.25x of its MACs
(uniform L1, exact MACs target); then, for the same epochs: no recovery, fine-tune with
labels only, logit KD, logit + channel-aligned feature KD, and logit KD into a
from-scratch thin student of the same MACs. Every method chooses its own learning rate
(`lr="auto"`, the default: short trials of its own loss, scored on validation), so the
comparison is between methods, not schedules; the chosen rates are listed. Test accuracy,
mean and standard deviation over the seeds (best validation epoch restored), and the
difference to label-only fine-tuning (mean of the per-seed differences ± its standard
error). Recovery runs on the teacher's whole training set, and on a quarter / a tenth of
it (the original data at hand only in part, the common case).

    python -m bench.distill_table [digits] ['digits, 25% data'] [MNIST-1D] ['MNIST-1D, 25% data'] ...  # ~35 minutes
"""

from __future__ import annotations

import collections
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import fxslim
from fxslim.passes.distill import distill, thin_copy
from fxslim.runtime.examples import (
    MNIST1DCNN,
    DigitsResNet,
    accuracy,
    digits_splits,
    mnist1d_loaders,
)

SEEDS = tuple(range(5))  # 10 in the tables before lr="auto"; 5 to fit the time the trials add


def teacher_fit(model: torch.nn.Module, train: DataLoader, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The teachers of every table so far: AdamW at 3e-3, cosine to zero, labels only (the
    `examples.fit` of before lr="auto"), kept as it was so that the teachers do not change."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(train)))
    model.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


def _digits_net() -> torch.nn.Module:
    return DigitsResNet(width=64)


def _recovery(dataset, n: int, batch_size: int) -> DataLoader:
    """The first `n` samples, shuffled from torch's global generator, which `distill(seed=)`
    seeds: every method sees the same batches for a seed, whatever ran before it."""
    return DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=True)


def datasets():
    # (name, teacher factory, teacher's training data, recovery data, val, test, example, feature
    #  layers, teacher epochs, recovery epochs); every block trains its own teacher from fresh
    # loaders, so each block's teacher is the same whichever blocks run before it.
    # 30 teacher epochs: an 8-epoch teacher (98.9%) was beaten by its own pruned students
    x, feats = torch.randn(1, 1, 8, 8), ["block2.0", "block4.0"]
    for label, share in (("digits", 1), ("digits, 25% data", 4)):
        tr, va, te = digits_splits(seed=0)
        n = len(tr.dataset)
        yield label, _digits_net, tr, _recovery(tr.dataset, n // share, 64), va, te, x, feats, 30, 6
    # 40 teacher epochs: a 12-epoch teacher (97.0%) was beaten by its own pruned students
    # fine-tuned longer with labels (97.3%), i.e. it was not converged. The scarce-data
    # blocks recover on a quarter / a tenth of the teacher's training data (875 / 350
    # signals): the original training set only partly at hand, the common case.
    x, feats = torch.randn(1, 1, 40), ["features.3", "features.9"]
    for label, pct, batch in (("MNIST-1D", 100, 128), ("MNIST-1D, 25% data", 25, 64), ("MNIST-1D, 10% data", 10, 64)):
        tr, te = mnist1d_loaders(seed=0)
        n = len(tr.dataset) - 500
        val = DataLoader(Subset(tr.dataset, range(n, n + 500)), batch_size=512)
        train = DataLoader(Subset(tr.dataset, range(n)), batch_size=128, shuffle=True,
                           generator=torch.Generator().manual_seed(0))
        yield label, _mnist1d_net, train, _recovery(tr.dataset, n * pct // 100, batch), val, te, x, feats, 40, 15


def _mnist1d_net() -> torch.nn.Module:
    return MNIST1DCNN(width=64)


def teacher_for(make, train: DataLoader, t_epochs: int) -> torch.nn.Module:
    """The block's teacher: trained by `teacher_fit` on 2 threads (as for every table so far),
    or loaded from $FXSLIM_BENCH_TEACHERS/<model>-<epochs>.pt where an earlier run saved it
    (to split the benches over processes without training each teacher again)."""
    torch.manual_seed(0)  # the same teacher whichever datasets run before
    model = make()
    cache = os.environ.get("FXSLIM_BENCH_TEACHERS")
    path = os.path.join(cache, f"{type(model).__name__}-{t_epochs}.pt") if cache else None
    if path and os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    teacher = teacher_fit(model, train, t_epochs)
    torch.set_num_threads(threads)
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(teacher.state_dict(), path)
    return teacher


def run(name, make, train, recover, val, test, x, feats, t_epochs, epochs) -> list[str]:
    teacher = teacher_for(make, train, t_epochs)
    t_acc = accuracy(teacher, test)
    rows = [f"| {name} | teacher | {t_epochs} | 1.00 | 3e-03 (given) | {t_acc * 100:.2f} | - | - |"]
    head = "fc"
    for budget in (0.5, 0.25):
        res: dict[str, list[float]] = {}
        lrs: dict[str, list[float]] = {}
        for seed in SEEDS:
            small = fxslim.prune(teacher, x, target_macs=budget, ignore=[head])
            res.setdefault("no recovery", []).append(accuracy(small, test))
            kw = {"epochs": epochs, "progress": False, "seed": seed, "device": "cpu"}  # lr="auto"
            runs = {
                "fine-tune (labels only)": {"alpha": 0.0},
                "logit KD": {"alpha": 0.9, "temperature": 4.0},
                "logit + feature KD": {"alpha": 0.9, "temperature": 4.0, "features": feats, "feature_weight": 1.0},
            }
            for label, extra in runs.items():
                student = fxslim.prune(teacher, x, target_macs=budget, ignore=[head])
                out = distill(student, teacher, recover, val, **kw, **extra)
                res.setdefault(label, []).append(accuracy(out.student, test))
                lrs.setdefault(label, []).append(out.lr)
            ratio = fxslim.prune(teacher, x, target_macs=budget, ignore=[head], dry_run=True).ratio
            thin = thin_copy(teacher, x, ratio, ignore=[head])
            out = distill(thin, teacher, recover, val, **kw, alpha=0.9, temperature=4.0)
            res.setdefault("KD into thin student (scratch)", []).append(accuracy(out.student, test))
            lrs.setdefault("KD into thin student (scratch)", []).append(out.lr)
        macs = fxslim.count_macs(fxslim.prune(teacher, x, target_macs=budget, ignore=[head]), x) / fxslim.count_macs(teacher, x)
        base = res["fine-tune (labels only)"]
        for label, accs in res.items():
            mean = statistics.mean(accs) * 100
            sd = statistics.stdev(accs) * 100
            vs = "-" if label in ("no recovery", "fine-tune (labels only)") else _paired(accs, base)
            rows.append(f"| {name} | {label} | {epochs} | {macs:.2f} | {_chosen(lrs.get(label, []))} | "
                        f"{mean:.2f} ± {sd:.2f} | {mean - t_acc * 100:+.2f} | {vs} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _chosen(lrs: list[float]) -> str:
    """The learning rates the trials chose, with how many seeds chose each (e.g. "3e-03 x4, 1e-02")."""
    if not lrs:
        return "-"
    counts = sorted(collections.Counter(lrs).items())
    return ", ".join(f"{lr:.0e}" + (f" x{n}" if n > 1 else "") for lr, n in counts)


def _paired(accs: list[float], base: list[float]) -> str:
    """Mean per-seed difference to label-only (same seed, same pruned start) ± its standard error."""
    diff = [(a - b) * 100 for a, b in zip(accs, base)]
    return f"{statistics.mean(diff):+.2f} ± {statistics.stdev(diff) / len(diff) ** 0.5:.2f}"


def table(names: tuple[str, ...] = ()) -> str:
    torch.set_num_threads(1)  # recovery: tiny ops, where a second thread mostly waits (and stalls on a busy machine)
    rows = [(f"| data | method | epochs | MACs kept | lr chosen | test accuracy % ({len(SEEDS)} seeds) "
             "| vs teacher | vs label-only (± s.e.) |"),
            "|---|---|---|---|---|---|---|---|"]
    for args in datasets():
        if not names or args[0] in names:
            rows += run(*args)
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(tuple(sys.argv[1:])))
