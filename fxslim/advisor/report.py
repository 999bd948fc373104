"""The advisor's output: the Markdown table, the recommendation, results.json and the plots
(accuracy against measured latency with the front; validation accuracy per epoch)."""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["table", "text", "write"]

HEAD = [
    "target",
    "recipe",
    "seeds",
    "accuracy % (± s.e.)",
    "precision",
    "recall",
    "F1",
    "params",
    "MACs",
    "torch ms",
    "ort ms",
    "latency x",
    "train s",
    "front",
]


def _f(v: float, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def table(rows: list[dict[str, Any]], front: list[int]) -> str:
    """One Markdown row per (target, recipe); "front": on the accuracy-latency front of all rows."""
    out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for i, r in enumerate(rows):
        acc = _f(100 * r["accuracy"], ".2f") + (
            f" ± {_f(100 * r['accuracy_se'], '.2f')}" if math.isfinite(r["accuracy_se"]) else ""
        )
        cells = [
            "original" if r["target"] is None else f"{r['target']:g}x",
            r["recipe"],
            str(len(r["seeds"]) or "-"),
            acc,
            _f(r["precision"], ".4f"),
            _f(r["recall"], ".4f"),
            _f(r["f1"], ".4f"),
            f"{r['params'] / 1e6:.3f}M",
            f"{r['macs'] / 1e6:.2f}M",
            _f(r["torch_ms"], ".3f"),
            _f(r["ort_ms"], ".3f"),
            _f(r["latency_ratio"], ".2f"),
            _f(r["train_seconds"], ".1f"),
            "yes" if i in front else "",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def text(
    rows: list[dict[str, Any]],
    front: dict[str, list[int]],
    recs: list[dict[str, Any]],
    kind: str,
    n_val: int,
) -> str:
    seeds = max((len(r["seeds"]) for r in rows), default=0)
    lines = [
        (
            f"fxslim advise: {kind} targets, accuracy on {n_val} validation examples, "
            f"mean over {seeds} seed(s); latency: on the example input, median, each architecture timed "
            "side by side with the original"
        ),
        "",
        table(rows, front["all"]),
        "",
        "Recommendation:",
    ]
    lines += [f"- {r['text']}" for r in recs]
    on = [
        f"{rows[i]['recipe']}"
        + (f" @ {rows[i]['target']:g}x" if rows[i]["target"] is not None else "")
        for i in front["all"]
    ]
    lines += [
        "",
        "Accuracy-latency front (no other row both more accurate and faster): " + ", ".join(on),
    ]
    return "\n".join(lines)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def plots(
    rows: list[dict[str, Any]],
    front: list[int],
    recs: list[dict[str, Any]],
    records: list[dict[str, Any]],
    kind: str,
) -> dict[str, bytes]:
    """{file name: PNG bytes}: accuracy vs latency (front joined, recommended ringed) and training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    targets = sorted({r["target"] for r in rows if r["target"] is not None}, reverse=True)
    colours = dict(zip(targets, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    chosen = {(c["target"], c["recipe"]) for c in recs}
    for r in rows:
        colour = colours.get(r["target"], "black")
        se = 100 * r["accuracy_se"] if math.isfinite(r["accuracy_se"]) else 0.0
        ax.errorbar(
            r["torch_ms"], 100 * r["accuracy"], yerr=se, fmt="o", color=colour, ms=5, capsize=2
        )
        if (r["target"], r["recipe"]) in chosen:
            ax.plot(r["torch_ms"], 100 * r["accuracy"], "o", ms=13, mfc="none", mec=colour, mew=1.5)
        ax.annotate(
            r["recipe"],
            (r["torch_ms"], 100 * r["accuracy"]),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=7,
            color=colour,
        )
    pts = sorted((rows[i]["torch_ms"], 100 * rows[i]["accuracy"]) for i in front)
    ax.step(
        [p[0] for p in pts],
        [p[1] for p in pts],
        where="post",
        color="grey",
        lw=1,
        ls="--",
        label="front",
    )
    for t in targets:
        ax.plot([], [], "o", color=colours[t], label=f"{t:g}x {kind}")
    ax.plot([], [], "o", color="black", label="original")
    ax.plot([], [], "o", ms=10, mfc="none", mec="grey", label="recommended")
    trained = [r for r in rows if r["recipe"] != "prune-only" or r["accuracy"] > 0.5]
    if trained:  # untrained pruned models near chance would squash the interesting part
        lo = min(100 * r["accuracy"] for r in trained)
        ax.set_ylim(max(0.0, lo - 1.5), min(100.5, max(100 * r["accuracy"] for r in rows) + 0.8))
    ax.set_xlabel("torch latency, ms (the example input, median)")
    ax.set_ylabel("validation accuracy %")
    ax.set_title("accuracy against measured latency (mean ± s.e. over seeds)")
    ax.legend(fontsize=7, loc="lower right")
    out = {"accuracy_latency.png": _png(fig)}

    fig, axes = plt.subplots(
        1, max(len(targets), 1), figsize=(4.5 * max(len(targets), 1), 3.3), squeeze=False
    )
    for ax, t in zip(axes[0], targets):
        first = {}
        for rec in records:
            if rec["target"] == t and rec["history"] and rec["recipe"] not in first:
                first[rec["recipe"]] = rec
        for name, rec in first.items():
            h = [row for row in rec["history"] if "val_accuracy" in row]
            ax.plot(
                [i + 1 for i in range(len(h))],
                [100 * row["val_accuracy"] for row in h],
                "o-",
                ms=3,
                label=name,
            )
        ax.set_title(f"{t:g}x {kind} (seed {min(rec['seed'] for rec in records)})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy %")
        ax.legend(fontsize=7)
    out["training.png"] = _png(fig)
    return out


def write(store: Any, result: Any, kind: str) -> None:
    """results.json, results.md and the PNGs into the advisor's directory."""
    rows = [{k: v for k, v in r.items()} for r in result.rows]
    store.write(
        "results.json",
        {
            "target_kind": kind,
            "rows": rows,
            "front": result.front,
            "recommendations": result.recommendations,
            "settings": store.settings,
        },
    )
    for name, data in plots(
        result.rows, result.front["all"], result.recommendations, result.records, kind
    ).items():
        store.write(name, data)
    store.write(
        "results.md",
        result.text + "\n\n![accuracy vs latency](accuracy_latency.png)\n\n"
        "![training curves](training.png)\n",
    )
