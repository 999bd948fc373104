"""The run report: Markdown (PNG files beside it) and one self-contained HTML page (the
same PNGs embedded as base64), from the finished steps' records.

Sections: a before/after table (params, MACs, latency p50/p90 in torch and onnxruntime,
accuracy, precision, recall, F1), every stage's numbers, per-layer widths before and after,
accuracy against latency (or MACs, without a benchmark step) per stage, training curves of
the finetune/distill steps, and the pinned channel groups with their reasons.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "count":
        return f"{v / 1e6:.3f}M"
    if kind == "ms":
        return f"{v:.3f}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _latency(records: dict, name: str, backend: str) -> dict | None:
    for rec in records.values():
        if rec["kind"] == "benchmark":
            row = rec["metrics"]["stages"].get(name, {})
            key = next((k for k in row if k.startswith(f"{backend}_bs")), None)
            return row.get(key) if key else None
    return None


def _row(records: dict, name: str) -> list[str]:
    m = records[name]["metrics"]
    ev = m.get("eval", {})
    t, o = _latency(records, name, "torch") or {}, _latency(records, name, "onnxruntime") or {}
    return [name, _fmt(m["params"], "count"), _fmt(m["macs"], "count"), _fmt(t.get("p50_ms"), "ms"),
            _fmt(t.get("p90_ms"), "ms"), _fmt(o.get("p50_ms"), "ms"), _fmt(o.get("p90_ms"), "ms"),
            _fmt(ev.get("accuracy")), _fmt(ev.get("precision")), _fmt(ev.get("recall")), _fmt(ev.get("f1"))]


_HEAD = ["stage", "params", "MACs", "torch p50 ms", "torch p90 ms", "ort p50 ms", "ort p90 ms",
         "accuracy", "precision", "recall", "F1"]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _charts(records: dict, before: str, after: str) -> dict[str, tuple[str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts: dict[str, tuple[str, bytes]] = {}
    wb, wa = records[before]["metrics"]["widths"], records[after]["metrics"]["widths"]
    layers = [k for k in wb if k in wa]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 3.5))
    xs = range(len(layers))
    ax.bar([x - 0.2 for x in xs], [wb[k] for k in layers], 0.4, label=f"before ({before})")
    ax.bar([x + 0.2 for x in xs], [wa[k] for k in layers], 0.4, label=f"after ({after})")
    ax.set_xticks(list(xs), layers, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("output channels")
    ax.legend()
    ax.set_title("per-layer widths")
    charts["widths"] = ("Per-layer widths before and after", _png(fig))

    stages = [n for n, r in records.items() if "eval" in r["metrics"]]
    if stages:
        lat = {n: (_latency(records, n, "torch") or {}).get("p50_ms") for n in stages}
        use_lat = all(v is not None for v in lat.values())
        xv = [lat[n] if use_lat else records[n]["metrics"]["macs"] / 1e6 for n in stages]
        yv = [records[n]["metrics"]["eval"]["accuracy"] for n in stages]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.scatter(xv, yv, zorder=2)
        for n, x, y in zip(stages, xv, yv):
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("torch latency p50 (ms, batch 1)" if use_lat else "MACs (M)")
        ax.set_ylabel("validation accuracy")
        ax.set_title("accuracy vs latency per stage" if use_lat else "accuracy vs MACs per stage")
        charts["tradeoff"] = ("Accuracy against " + ("latency" if use_lat else "MACs") + " per stage", _png(fig))

    if "confusion" in records[after]["metrics"]:
        cm = records[after]["metrics"]["confusion"]
        fig, ax = plt.subplots(figsize=(4.2, 3.8))
        im = ax.imshow(cm, cmap="Blues")
        for r, row in enumerate(cm):
            for c, v in enumerate(row):
                if v:
                    ax.text(c, r, str(v), ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 * max(map(max, cm)) else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix ({after})")
        fig.colorbar(im, ax=ax, fraction=0.046)
        charts["confusion"] = (f"Confusion matrix after ({after}, validation data)", _png(fig))

    trained = [n for n, r in records.items() if r["metrics"].get("history")]
    if trained:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        for n in trained:
            h = records[n]["metrics"]["history"]
            ep = [row["epoch"] + 1 for row in h]
            a1.plot(ep, [row["train_loss"] for row in h], "o-", label=n)
            if "val_accuracy" in h[0]:
                a2.plot(ep, [row["val_accuracy"] for row in h], "o-", label=n)
        a1.set_xlabel("epoch")
        a1.set_ylabel("train loss")
        a2.set_xlabel("epoch")
        a2.set_ylabel("val accuracy")
        a1.legend(fontsize=8)
        charts["training"] = ("Training curves", _png(fig))
    return charts


def write_report(cfg: Any, records: dict, before: str, after: str, folder: Path, title: str | None) -> list[str]:
    """Write report.md, report.html and the charts' PNGs into `folder`; returns the file names."""
    title = title or f"fxslim pipeline report: {cfg.name}"
    charts = _charts(records, before, after)
    rows_ba = [_row(records, before), _row(records, after)]
    rows_all = [_row(records, n) for n, r in records.items() if "params" in r["metrics"]]
    pinned = records[next(iter(records))]["metrics"].get("pinned", [])
    steps = [(n, r["kind"], r.get("options"), r["seconds"]) for n, r in records.items()]
    onnx = next((r["metrics"]["onnx"] for r in records.values() if r["kind"] == "export"), {})

    def md_table(head: list[str], rows: list[list[str]]) -> str:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])

    md = [f"# {title}", "", (f"Model `{cfg.model}`, data `{cfg.data}`, seed {cfg.seed}, "
          f"{cfg.threads} thread(s). Latency: batch 1, 1 thread unless the benchmark step says otherwise."),
          "", "## Before and after", "", md_table(_HEAD, rows_ba), "", "## Every stage", "",
          md_table(_HEAD, rows_all), ""]
    for key, (caption, data) in charts.items():
        (folder / f"{key}.png").write_bytes(data)
        md += [f"## {caption}", "", f"![{caption}]({key}.png)", ""]
    if onnx:
        md += ["## ONNX", "", md_table(["file", "stage", "exporter", "opset", "max diff", "bytes"],
               [[v["path"], v["stage"], v["exporter"], str(v["opset"]), f"{v['max_diff']:.2e}",
                 str(v["file_bytes"])] for v in onnx.values()]), ""]
    md += ["## Pinned channel groups", ""]
    md += [f"- group {p['group']} ({p['size']} channels): {p['reason']}" for p in pinned] or ["(none)"]
    md += ["", "## Steps", "", md_table(["step", "kind", "options", "seconds"],
                                        [[n, k, f"`{o}`" if o else "-", f"{s:.1f}"] for n, k, o, s in steps]), ""]
    (folder / "report.md").write_text("\n".join(md))

    def h_table(head: list[str], rows: list[list[str]]) -> str:
        th = "".join(f"<th>{html.escape(c)}</th>" for c in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<h1>{html.escape(title)}</h1>",
             (f"<p>Model <code>{html.escape(cfg.model)}</code>, data <code>{html.escape(str(cfg.data))}</code>, "
             f"seed {cfg.seed}, {cfg.threads} thread(s).</p>"),
             "<h2>Before and after</h2>", h_table(_HEAD, rows_ba), "<h2>Every stage</h2>", h_table(_HEAD, rows_all)]
    for key, (caption, data) in charts.items():
        b64 = base64.b64encode(data).decode()
        parts += [f"<h2>{html.escape(caption)}</h2>",
                  f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">']
    if onnx:
        parts += ["<h2>ONNX</h2>", h_table(["file", "stage", "exporter", "opset", "max diff", "bytes"],
                  [[v["path"], v["stage"], v["exporter"], str(v["opset"]), f"{v['max_diff']:.2e}",
                    str(v["file_bytes"])] for v in onnx.values()])]
    parts += ["<h2>Pinned channel groups</h2><ul>"
              + "".join(f"<li>group {p['group']} ({p['size']} channels): {html.escape(str(p['reason']))}</li>"
                        for p in pinned) + "</ul>" if pinned else "<h2>Pinned channel groups</h2><p>(none)</p>"]
    parts += ["<h2>Steps</h2>", h_table(["step", "kind", "options", "seconds"],
                                        [[n, k, str(o) if o else "-", f"{s:.1f}"] for n, k, o, s in steps])]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    (folder / "report.html").write_text(page)
    return ["report.md", "report.html"] + [f"{k}.png" for k in charts]
