"""The advisor's output on digits and MNIST-1D at 0.5x and 0.25x measured latency (3 seeds),
and the held-out test accuracy of the recommended recipe against the best one.

Teachers trained as in `bench.distill_table` (AdamW 3e-3, cosine), at width 64, digits 20
epochs, MNIST-1D 25 (cached in $FXSLIM_BENCH_TEACHERS when set). Latency is measured at batch 32 (at batch 1 these
models are a few hundred microseconds of per-op overhead, which pruning cannot halve),
1 thread, torch eager; the advisor sees the train and validation splits only, the test
split is read here afterwards, from the models the advisor saved.

    python -m bench.advise_table digits MNIST-1D     # each block also runs alone; ~13 min on 2 quiet cores
    python -m bench.advise_table --render            # the section of bench/README.md from the JSONs
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import fxslim
from bench.distill_table import teacher_fit
from fxslim.runtime.examples import MNIST1DCNN, DigitsResNet, digits_splits, mnist1d_loaders
from fxslim.runtime.train import evaluate

HERE = Path(__file__).parent
OUT = HERE / "advise"  # the JSON summaries and plots (committed)
RUNS = Path(
    os.environ.get("FXSLIM_ADVISE_RUNS", "/tmp/fxslim-advise")
)  # models, records (not committed)
SEEDS = [0, 1, 2]
# the rates `lr="auto"` chose most in the distillation tables: 2 trials, not 4 (the shared CPU)
LRS = (3e-3, 1e-2)
START, END = "<!-- advise-table:start -->", "<!-- advise-table:end -->"


def _digits_net() -> torch.nn.Module:
    return DigitsResNet(width=64)


def _mnist1d_net() -> torch.nn.Module:
    return MNIST1DCNN(width=64)


def teacher_for(make, train: DataLoader, epochs: int) -> torch.nn.Module:
    """`bench.distill_table.teacher_fit` on 1 thread (2 threads crawl on a loaded machine),
    cached in $FXSLIM_BENCH_TEACHERS/advise-<model>-<epochs>.pt when set."""
    torch.manual_seed(0)
    model = make()
    cache = os.environ.get("FXSLIM_BENCH_TEACHERS")
    path = Path(cache) / f"advise-{type(model).__name__}-{epochs}.pt" if cache else None
    if path and path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    teacher = teacher_fit(model, train, epochs)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), path)
    return teacher


def blocks():
    """(name, teacher factory, teacher's train, val, test, example input, teacher epochs, budget).
    The built-ins' default width (64); recovery budgets of 6 (digits) and 10 (MNIST-1D) epochs."""
    tr, va, te = digits_splits(seed=0)
    yield "digits", _digits_net, tr, va, te, torch.randn(32, 1, 8, 8), 20, 6
    tr, te = mnist1d_loaders(seed=0)
    n = len(tr.dataset) - 500
    val = DataLoader(Subset(tr.dataset, range(n, n + 500)), batch_size=512)
    train = DataLoader(
        Subset(tr.dataset, range(n)),
        batch_size=128,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    yield "MNIST-1D", _mnist1d_net, train, val, te, torch.randn(32, 1, 40), 25, 10


def _mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (
        statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan
    )


def run(name, make, train, val, test, x, t_epochs, budget) -> dict:
    t0 = time.perf_counter()
    teacher = teacher_for(make, train, t_epochs)
    out = RUNS / name.lower().replace("-", "")
    res = fxslim.advise(
        teacher,
        x,
        train,
        val,
        out_dir=out,
        targets=[0.5, 0.25],
        target_kind="latency",
        budget=budget,
        seeds=SEEDS,
        lr=LRS,
        threads=1,
        log=lambda s: print(
            f"[{name} {time.perf_counter() - t0:7.0f} s] {s}", file=sys.stderr, flush=True
        ),
    )
    held = []
    for rec in res.recommendations:
        accs = {}
        for recipe in {rec["recipe"], rec["best"]}:
            accs[recipe] = [
                evaluate(fxslim.load(out / r["model"], make()), test)["accuracy"]
                for r in sorted(res.records, key=lambda r: r["seed"])
                if r["target"] == rec["target"] and r["recipe"] == recipe
            ]
        diff = [a - b for a, b in zip(accs[rec["recipe"]], accs[rec["best"]])]
        held.append(
            {
                "target": rec["target"],
                "recommended": rec["recipe"],
                "best": rec["best"],
                "recommended_test": _mean_se(accs[rec["recipe"]]),
                "best_test": _mean_se(accs[rec["best"]]),
                "diff": _mean_se(diff),
            }
        )
    OUT.mkdir(exist_ok=True)
    stem = name.lower().replace("-", "")
    for png in ("accuracy_latency.png", "training.png"):
        shutil.copyfile(out / png, OUT / f"{stem}_{png}")
    summary = {
        "name": name,
        "teacher_epochs": t_epochs,
        "budget": budget,
        "seeds": SEEDS,
        "text": res.text,
        "held_out": held,
        "teacher_test": evaluate(teacher, test)["accuracy"],
        "n_test": sum(len(b[1]) for b in test),
        "minutes": (time.perf_counter() - t0) / 60,
    }
    (OUT / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    return summary


def _pct(ms: tuple[float, float]) -> str:
    m, se = ms
    return f"{100 * m:.2f}" + (f" ± {100 * se:.2f}" if math.isfinite(se) else "")


def render() -> str:
    lines = [
        START,
        "### The advisor: `fxslim.advise` on digits and MNIST-1D",
        "",
        "`python -m bench.advise_table digits MNIST-1D`: `fxslim.advise(teacher, x, train, val,",
        'targets=[0.5, 0.25], target_kind="latency", seeds=[0, 1, 2])` with every default recipe,',
        "each with the learning rate its own trials chose between 3e-3 and 1e-2. Run on 2 quiet",
        "cores (AMD EPYC, AVX2): the built-in models at their default width 64, teachers trained",
        "20 (digits) / 25 (MNIST-1D) epochs, recovery budgets of 6 / 10 epochs per recipe (the",
        "distillation tables above use 6 / 15). Latency at batch 32, 1 thread, torch eager and",
        "onnxruntime (at batch 1 these models are mostly per-op overhead, which pruning cannot",
        "halve); every architecture timed side by side with the original, so the latency column",
        "measures the models, the load only in part. The advisor saw the train and validation",
        "splits only; the held-out test accuracy below is read afterwards from the models it",
        "saved (per seed; the difference is paired by seed).",
        "",
    ]
    for stem in ("digits", "mnist1d"):
        path = OUT / f"{stem}.json"
        if not path.exists():
            lines += [f"({stem}: not run yet)", ""]
            continue
        s = json.loads(path.read_text())
        lines += [
            (
                f"#### {s['name']} (teacher {s['teacher_epochs']} epochs, test {100 * s['teacher_test']:.2f}%; "
                f"budget {s['budget']} epochs per recipe; {s['minutes']:.0f} minutes)"
            ),
            "",
            s["text"],
            "",
            f"![{s['name']}: accuracy against latency](advise/{stem}_accuracy_latency.png)",
            f"![{s['name']}: training curves](advise/{stem}_training.png)",
            "",
            f"Held-out test ({s['n_test']} examples, {len(s['seeds'])} seeds):",
            "",
            (
                "| target | recommended | test % (± s.e.) | best on validation | test % (± s.e.) "
                "| recommended - best (± s.e.) |"
            ),
            "|---|---|---|---|---|---|",
        ]
        for h in s["held_out"]:
            lines.append(
                f"| {h['target']:g}x | {h['recommended']} | {_pct(h['recommended_test'])} | {h['best']} | "
                f"{_pct(h['best_test'])} | {_pct(h['diff'])} |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_readme() -> None:
    path = HERE / "README.md"
    text = path.read_text()
    section = render()
    if START in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        anchor = "## LLM importance"
        text = text.replace(anchor, section + "\n\n" + anchor, 1)
    path.write_text(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    for args in blocks():
        if args[0] in names:
            run(*args)
    if "--render" in sys.argv or not names:
        write_readme()
