"""The advisor's arithmetic: rows from records, paired differences, the Pareto front and
the recommendation.

A *row* is one recipe at one target, over its seeds: means of accuracy, precision,
recall, F1 and training time, the standard error of the accuracy (sample standard
deviation / sqrt(seeds)), and the architecture's measured latency. The reference row is
the original model.

Noise. Two recipes at a target are compared seed by seed (for a seed both started from
the same pruned weights and saw the same batches): d_s = acc_best,s - acc_r,s. The
difference is *within noise* when mean(d) <= max(2 se(d), 1 / n_val), se(d) = sd(d) /
sqrt(seeds): inside two standard errors of the paired difference, or at most one
validation example. With one seed there is no standard error, only the one-example rule.

Front: a row is on the front unless another row is both more accurate (mean accuracy)
and faster (measured torch latency); rows of one architecture share one latency
measurement, so they tie on that axis and only a faster, more accurate row removes them.

Recommendation, per target, among that target's rows on that target's front (the
original is the reference, not a candidate): the most accurate row, then every row within noise of it;
of those the cheapest recipe (its `cost`, then the mean measured training time). When
even the best keeps under 90% of the original's accuracy, the words say the target is too
far for the budget.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["dominates", "paired", "pareto_front", "recommend", "rows_from_records", "within_noise"]


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _se(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def rows_from_records(
    records: Sequence[Mapping[str, Any]],
    latency: Mapping[str, Mapping[str, float]],
    order: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per (target, recipe) from the per-seed records; `latency` is by architecture key."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for rec in records:
        groups.setdefault((rec["target"], rec["recipe"]), []).append(rec)
    rows = []
    for (target, recipe), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["seed"])
        accs = [r["metrics"]["accuracy"] for r in recs]
        lat = latency.get(recs[0]["arch"], {})
        rows.append(
            {
                "target": target,
                "recipe": recipe,
                "seeds": [r["seed"] for r in recs],
                "accuracies": accs,
                "accuracy": _mean(accs),
                "accuracy_se": _se(accs),
                **{
                    k: _mean([r["metrics"][k] for r in recs]) for k in ("precision", "recall", "f1")
                },
                "params": recs[0]["params"],
                "macs": recs[0]["macs"],
                "arch": recs[0]["arch"],
                "train_seconds": _mean([r["seconds"] for r in recs]),
                "lrs": [lr for r in recs for lr in r.get("lrs", [])],
                "torch_ms": lat.get("torch_ms", math.nan),
                "ort_ms": lat.get("ort_ms", math.nan),
                "latency_ratio": lat.get("ratio", math.nan),
            }
        )
    rank = {name: i for i, name in enumerate(order)}
    rows.sort(
        key=lambda r: (
            r["target"] is not None,
            -(r["target"] or 0),
            rank.get(r["recipe"], len(rank)),
        )
    )
    return rows


def dominates(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """`a` is both more accurate and faster than `b`."""
    return a["accuracy"] > b["accuracy"] and a["torch_ms"] < b["torch_ms"]


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the rows that no other row dominates (see the module doc)."""
    return [
        i
        for i, r in enumerate(rows)
        if not any(dominates(s, r) for j, s in enumerate(rows) if j != i)
    ]


def paired(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float, int]:
    """Mean over shared seeds of accuracy(a) - accuracy(b), its standard error, and the number of seeds."""
    pa, pb = dict(zip(a["seeds"], a["accuracies"])), dict(zip(b["seeds"], b["accuracies"]))
    d = [pa[s] - pb[s] for s in pa if s in pb]
    return _mean(d), _se(d), len(d)


def within_noise(diff: float, se: float, n_val: int) -> bool:
    """A paired accuracy difference indistinguishable from zero (see the module doc)."""
    bound = max(2 * se if math.isfinite(se) else 0.0, 1.0 / max(n_val, 1))
    return diff <= bound + 1e-12


def _pts(x: float) -> str:
    return f"{100 * x:.2f}"


def _versus(r: Mapping[str, Any], chosen: Mapping[str, Any]) -> str:
    """'name acc% (+d ± se)': a row against the chosen one, paired by seed, in points."""
    d, se, _ = paired(r, chosen)
    return f"{r['recipe']} {_pts(r['accuracy'])}% ({100 * d:+.2f} ± {_pts(se) if math.isfinite(se) else '-'})"


def recommend(
    rows: Sequence[dict[str, Any]],
    target: float,
    kind: str,
    costs: Mapping[str, float],
    n_val: int,
    reference: Mapping[str, Any],
) -> dict[str, Any]:
    """The recommendation for one target: the chosen row, the rows within noise and the words."""
    mine = [r for r in rows if r["target"] == target]
    front = [mine[i] for i in pareto_front(mine)]
    best = max(front, key=lambda r: r["accuracy"])
    close, apart = [], []
    for r in front:
        d, se, n = paired(best, r)
        (close if r is best or within_noise(d, se, n_val) else apart).append((r, d, se, n))
    chosen = min(close, key=lambda t: (costs.get(t[0]["recipe"], math.inf), t[0]["train_seconds"]))[
        0
    ]
    ratio = chosen["latency_ratio"]
    kept = chosen["accuracy"] / reference["accuracy"] if reference["accuracy"] else math.nan
    head = (
        f"at {target:g}x {kind}"
        + (f" (measured {ratio:.2f}x the original's latency)" if math.isfinite(ratio) else "")
        + f": {chosen['recipe']}, {_pts(chosen['accuracy'])}% "
        f"({100 * kept:.1f}% of the original's {_pts(reference['accuracy'])}%)"
    )
    seeds = len(best["seeds"])
    noise = (
        f"paired over {seeds} seeds, within noise = inside 2 standard errors or one validation example"
        if seeds > 1
        else "1 seed: no standard error, only a one-example difference counts as noise"
    )
    if len(close) > 1:
        others = ", ".join(_versus(r, chosen) for r, *_ in close if r is not chosen)
        why = (
            f"the cheapest of the recipes within noise of the best ({best['recipe']}); no measurable "
            f"difference to: {others} ({noise})"
        )
        if chosen is best:
            why = f"the best, and the cheapest within noise of it; no measurable difference to: {others} ({noise})"
    else:
        why = f"the best, ahead of every other recipe beyond noise ({noise})"
    if apart:
        r, d, se, _ = max(apart, key=lambda t: t[0]["accuracy"])
        err = _pts(se) if math.isfinite(se) else "-"
        why += f"; the closest beyond noise, {r['recipe']}, is {_pts(d)} ± {err} points behind {best['recipe']}"
    if best["accuracy"] < 0.9 * reference["accuracy"]:
        why += (
            "; no recipe keeps 90% of the original's accuracy here: this target is too far for "
            "this budget (more epochs, or a milder target)"
        )
    if all(dominates(reference, r) for r in mine):
        why += "; note: the original is both more accurate and faster than every row at this target"
    return {
        "target": target,
        "recipe": chosen["recipe"],
        "best": best["recipe"],
        "within_noise": [t[0]["recipe"] for t in close],
        "text": f"{head}: {why}.",
    }
