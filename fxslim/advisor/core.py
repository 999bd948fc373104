"""`fxslim.advise`: prune, distil or both, and how far? Measured on the user's model and data.

For each target (a fraction of the original's measured latency, MACs or params) the
original is pruned once (`fxslim.prune`), then every recipe (``fxslim.advisor.recipes``)
runs for every seed under the same training budget, each with its own tuned learning
rate; each result is evaluated on the validation data (accuracy, macro precision,
recall, F1), counted (params, MACs), saved (`fxslim.save`) and recorded. Then every
distinct architecture is timed side by side with the original on the CPU (torch eager
and onnxruntime). The table, the Pareto front and the recommendation follow from the
records (``fxslim.advisor.stats``); plots and results go to ``out_dir``. A second call on
the same directory skips every finished (target, recipe, seed).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxslim.advisor import report
from fxslim.advisor._checks import check_advise_args
from fxslim.advisor.recipes import (
    Recipe,
    RecipeContext,
    RecipeOutput,
    choose_features,
)
from fxslim.advisor.stats import pareto_front, recommend, rows_from_records
from fxslim.advisor.store import Store, arch_key, measure_side_by_side
from fxslim.errors import ArgumentError
from fxslim.runtime.measure import count_macs, count_params
from fxslim.runtime.train import _generators, evaluate

__all__ = ["AdviseResult", "advise"]

logger = logging.getLogger("fxslim.advise")


@dataclass
class AdviseResult:
    """The rows (one per target and recipe, plus the reference), the Pareto front (row
    indices: "all" over every row, and per target), one recommendation per target, the
    printable report and where everything was written."""

    rows: list[dict[str, Any]]
    front: dict[str, list[int]]
    recommendations: list[dict[str, Any]]
    text: str
    out_dir: Path
    ran: int = 0
    skipped: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def _count(data: Iterable) -> int:
    n = 0
    for batch in data:
        y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
        n += len(y) if y is not None else 0
    return n


def _pruned(
    store: Store, model: nn.Module, x: Any, target: float, kind: str, options: dict, threads: int
):
    """The target's one-shot pruned model: loaded from an earlier call, else pruned and saved."""
    import fxslim

    path = store.pruned_dir(target)
    if (path / "plan.json").is_file():
        return fxslim.load(path, model)
    opts = dict(options)
    if kind == "latency":
        opts["latency_options"] = {"threads": threads} | dict(opts.get("latency_options") or {})
    small = fxslim.prune(model, x, **{f"target_{kind}": target}, **opts)
    fxslim.save(small, path, overwrite=True)
    return small


def advise(
    model: nn.Module,
    example_inputs: Any,
    train_data: Iterable,
    val_data: Iterable,
    *,
    out_dir: str | Path,
    targets: Sequence[float] = (0.5, 0.25),
    target_kind: str = "latency",
    budget: int = 6,
    seeds: Sequence[int] = (0, 1, 2),
    recipes: Sequence[Recipe] | None = None,
    features: Sequence[str] | None = None,
    prune_options: dict[str, Any] | None = None,
    threads: int = 1,
    latency_runs: int = 50,
    onnx: bool = True,
    lr: float | str | Sequence[float] = "auto",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> AdviseResult:
    """Prune, distil or both, and how far: every recipe at every target, measured.

    Args:
        model: the trained original (left untouched); the teacher of the KD recipes.
        example_inputs: the input for pruning, MACs and latency (batch 1 for a deploy latency).
        train_data / val_data: labelled loaders; keep a test split away from the advisor.
        out_dir: where records, models (`fxslim.save`), ONNX files, results and plots go; an
            earlier advisor folder is resumed (finished runs are skipped).
        targets: fractions of the original's `target_kind` ("latency" measured, "macs", "params").
        budget: training epochs, the same for every recipe (iterative: split over its steps).
        seeds: each recipe runs once per seed; for a seed every recipe starts from the same
            pruned model and sees the same batches (paired comparisons).
        recipes: default `default_recipes()`; a list to change or extend (`Recipe(name, fn)`).
        features: layers for feature KD (default: `choose_features`).
        prune_options: more `fxslim.prune` keywords (ignore, round_to, importance ...).
        threads: torch / onnxruntime threads for the latency measurements and searches.
        onnx: also export each architecture and time it in onnxruntime.
        lr: every training recipe's learning rate; "auto" (default): each chooses its own
            by short trials of its own loss (`fxslim.distill`).
        progress: per-epoch progress bars (tqdm, stderr).
        log: called with progress lines (recipe k of n, ETA); default: the logger.

    Returns:
        An `AdviseResult` (`print(result)` shows the table, the front and the recommendation).

    Example:
        >>> res = fxslim.advise(model, x, train, val, out_dir="advice", targets=[0.5, 0.25], budget=6)
        >>> print(res.recommendations[0]["text"])
    """
    targets, seeds, recipes, options = check_advise_args(
        model,
        train_data,
        val_data,
        targets,
        target_kind,
        budget,
        seeds,
        recipes,
        features,
        prune_options,
        threads,
        latency_runs,
        lr,
    )
    root = Store.check(out_dir)
    say = log or logger.info
    n_val = _count(val_data)
    settings = {
        "target_kind": target_kind,
        "budget_epochs": budget,
        "n_val": n_val,
        "lr": str(lr),
        "prune_options": {k: str(v) for k, v in options.items()},
    }
    store = Store(root, settings)
    store.open()
    model.eval()
    reference = evaluate(model, val_data)
    gens = _generators(train_data)
    saved = [g.get_state() for g in gens]
    total, done, ran, skipped, spent = len(targets) * len(recipes) * len(seeds), 0, 0, 0, 0.0
    records, models = [], {arch_key(model): model}
    try:
        for target in targets:
            say(f"target {target:g}x {target_kind}: pruning the original")
            pruned = _pruned(store, model, example_inputs, target, target_kind, options, threads)
            models.setdefault(arch_key(pruned), pruned)
            ctx = RecipeContext(
                model,
                example_inputs,
                train_data,
                val_data,
                target_kind,
                target,
                budget,
                0,
                pruned,
                count_macs(pruned, example_inputs) / count_macs(model, example_inputs),
                count_params(pruned) / count_params(model),
                list(features) if features else choose_features(pruned, model),
                options,
                progress,
                lr,
            )
            for recipe in recipes:
                for seed in seeds:
                    done += 1
                    rec = store.finished(target, recipe.name, seed)
                    if rec is None:
                        eta = spent / ran * (total - done + 1) if ran else math.nan
                        say(
                            f"recipe {done} of {total}: {recipe.name}, target {target:g}, seed {seed}"
                            + (f" (ETA {eta / 60:.1f} min)" if ran else "")
                        )
                        for g in gens:  # the same batches for every recipe of a seed
                            g.manual_seed(seed)
                        ctx.seed = seed
                        rec, out = _run(store, recipe, ctx, val_data, example_inputs)
                        models.setdefault(rec["arch"], out)
                        ran, spent = ran + 1, spent + rec["seconds"]
                    else:
                        skipped += 1
                    records.append(rec)
    finally:
        for g, state in zip(gens, saved):
            g.set_state(state)
    return _finish(
        store,
        model,
        example_inputs,
        records,
        reference,
        recipes,
        targets,
        target_kind,
        n_val,
        models,
        threads,
        latency_runs,
        onnx,
        say,
        ran,
        skipped,
    )


def _run(
    store: Store, recipe: Recipe, ctx: RecipeContext, val_data: Iterable, x: Any
) -> tuple[dict, nn.Module]:
    import fxslim

    torch.manual_seed(ctx.seed)
    t0 = time.perf_counter()
    out = recipe.fn(ctx)
    seconds = time.perf_counter() - t0
    out = out if isinstance(out, RecipeOutput) else RecipeOutput(out)
    if not isinstance(out.model, nn.Module):
        raise ArgumentError(
            f"recipe '{recipe.name}' returned {type(out.model).__name__}, not an nn.Module"
        )
    m = out.model.eval()
    path = store.model_dir(ctx.target, recipe.name, ctx.seed)
    fxslim.save(m, path, overwrite=True)
    rec = {
        "target": ctx.target,
        "recipe": recipe.name,
        "seed": ctx.seed,
        "seconds": seconds,
        "metrics": evaluate(m, val_data),
        "params": count_params(m),
        "macs": count_macs(m, x),
        "arch": arch_key(m),
        "lrs": out.lrs,
        "history": out.history,
        "model": str(path.relative_to(store.root)),
    }
    store.write_record(rec)
    return rec, m


def _finish(
    store,
    model,
    x,
    records,
    reference,
    recipes,
    targets,
    kind,
    n_val,
    models,
    threads,
    runs,
    onnx,
    say,
    ran,
    skipped,
) -> AdviseResult:
    import fxslim

    for rec in records:  # architectures of resumed runs: their saved models
        if rec["arch"] not in models:
            models[rec["arch"]] = fxslim.load(store.root / rec["model"], model)
    say(f"timing {len(models)} architecture(s) side by side ({threads} thread(s))")
    order = {arch_key(model): model} | models
    latency = measure_side_by_side(
        order, x, threads=threads, runs=runs, onnx_dir=store.root / "onnx" if onnx else None
    )
    rows = rows_from_records(records, latency, [r.name for r in recipes])
    ref_lat = latency[arch_key(model)]
    ref = {
        "target": None,
        "recipe": "original",
        "seeds": [],
        "accuracies": [],
        "accuracy": reference["accuracy"],
        "accuracy_se": math.nan,
        **{k: reference[k] for k in ("precision", "recall", "f1")},
        "params": count_params(model),
        "macs": count_macs(model, x),
        "arch": arch_key(model),
        "train_seconds": 0.0,
        "lrs": [],
        "torch_ms": ref_lat["torch_ms"],
        "ort_ms": ref_lat.get("ort_ms", math.nan),
        "latency_ratio": 1.0,
    }
    rows.insert(0, ref)
    front = {"all": pareto_front(rows)}
    for t in targets:
        idx = [i for i, r in enumerate(rows) if r["target"] == t]
        front[f"{t:g}"] = [idx[j] for j in pareto_front([rows[i] for i in idx])]
    costs = {r.name: r.cost for r in recipes}
    recs = [recommend(rows, t, kind, costs, n_val, ref) for t in targets]
    text = report.text(rows, front, recs, kind, n_val)
    result = AdviseResult(rows, front, recs, text, store.root, ran, skipped, records)
    report.write(store, result, kind)
    say(f"advice written to {store.root} ({ran} run(s), {skipped} resumed)")
    return result
