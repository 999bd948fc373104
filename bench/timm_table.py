"""timm's model list through fxslim: per family, how many trace, prune, pass both oracles
and export to ONNX. Writes bench/TIMM.md.

A family is a timm model module (``timm.list_modules()``: resnet, efficientnet,
vision_transformer, ...). From each family the `per_family` models whose names mark them
smallest (atto, nano, tiny, small, b0 ..., then the shortest name) are tried, random init, eval, batch 1
at 64 px where the model takes it (ViT-like models are built with ``img_size=64``), else at
its configured input size. Each model gets `limit` seconds (SIGALRM); every stage that
fails records its error type and first line. Stages:

- trace: `fxslim.trace` (auto capture) and the traced graph equals the model's output;
- prune: `fxslim.prune(ratio=0.5)` with the classifier ignored, through the class-keeping
  default, runs and keeps fewer MACs (the share kept is listed);
- oracles: slicing consistency at ratio 0.5 and dead-channel equivalence on random
  channels of every statistic-free group (`fxslim.passes.verify`);
- export: `fxslim.export_onnx` of the pruned model (onnxruntime output equals torch's).

    python -m bench.timm_table [--per-family N] [--limit S] [--max-minutes M] [--out JSONL]

Lines already in the JSONL file are not run again: after `--max-minutes` (default 30) it
stops starting models and writes the table so far; run it again to continue.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import fxslim
from fxslim.passes.policy import uniform_removal
from fxslim.passes.prune import apply_plan, make_plan
from fxslim.passes.verify import dead_channel_check, max_scaled_diff, slicing_mismatches
from fxslim.runtime.measure import count_macs
from tests.zoo.zoo import _randomise_norms, random_removal

OUT = Path(__file__).with_name("TIMM.md")
RTOL, ATOL = 1e-4, 1e-5
STAGES = ("trace", "prune", "oracles", "export")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


# name parts that mark the small variants, smallest first (building the models to count
# parameters, even on the meta device, takes most of the time budget: names decide)
_SMALL = ("atto", "femto", "pico", "nano", "xxxs", "xxs", "xs", "tiny", "mini", "small", "s", "t",
          "b0", "lite0", "18", "050", "100", "b", "base")


def _smallness(name: str) -> tuple[int, int, str]:
    parts = name.replace("-", "_").replace(".", "_").split("_")
    return min((_SMALL.index(p) for p in parts if p in _SMALL), default=len(_SMALL)), len(name), name


def candidates(per_family: int) -> list[tuple[str, str]]:
    """(family, model) pairs: the `per_family` likeliest-smallest models (by name) of each timm module."""
    import timm

    return [(family, name) for family in sorted(timm.list_modules())
            for name in sorted(timm.list_models(module=family), key=_smallness)[:per_family]]


def build(name: str, **overrides) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The model (random init, eval), its input and its classifier path(s); `overrides` go to
    ``timm.create_model`` (e.g. ``depth=2``: the same blocks, fewer of them)."""
    import timm

    torch.manual_seed(0)
    for kw, size in (({"img_size": 64}, 64), ({}, 64), ({}, None)):
        try:
            model = timm.create_model(name, pretrained=False, **kw, **overrides).eval()
            side = size or model.pretrained_cfg["input_size"][-1]
            chans = model.pretrained_cfg["input_size"][0]
            x = torch.randn(1, chans, side, side, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                model(x)
            break
        except Exception:  # noqa: BLE001, S112 - the next (larger, default) configuration
            continue
    else:
        raise RuntimeError("does not run at 64 px nor at its configured size")
    _randomise_norms(model, 0)
    return model, x, model.pretrained_cfg.get("classifier") or ""


def run_one(name: str, **overrides) -> dict:
    """One model through the stages; the first failing stage ends it."""
    row: dict = {"model": name}
    model, x, head = build(name, **overrides)
    mods = dict(model.named_modules())
    ignore = [h for h in ((head,) if isinstance(head, str) else head) if h in mods]  # a tuple: several heads
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    row["input"] = list(x.shape)
    stage = "trace"
    try:
        gm = fxslim.trace(model, x, share_weights=True)
        with torch.no_grad():
            if max_scaled_diff(model(x), gm(x)) > RTOL:
                raise AssertionError("the traced graph's output differs from the model's")
        row["trace"] = "ok"
        stage = "prune"
        cg = fxslim.analyze(gm)
        row["groups"], row["prunable"] = len(cg.groups), sum(g.prunable for g in cg.groups)
        small = fxslim.prune(model, x, 0.5, ignore=ignore)
        row["macs_kept"] = round(count_macs(small, x) / count_macs(model, x), 3)
        row["form"] = "graph" if isinstance(small, torch.fx.GraphModule) else "class"
        if row["macs_kept"] >= 0.999:
            raise AssertionError("nothing pruned")
        row["prune"] = "ok"
        stage = "oracles"
        plan = make_plan(cg, uniform_removal(gm, cg, 0.5, ignore))
        half = apply_plan(gm, cg, plan, x)
        bad = slicing_mismatches(gm, half, plan)
        if bad:
            raise AssertionError(f"slicing: {bad[0]}")
        removal = random_removal(cg, np.random.default_rng(0))
        if removal:
            diff, _, _ = dead_channel_check(gm, cg, removal, x)
            if diff > RTOL + ATOL:
                raise AssertionError(f"dead channels change the output by {diff:.2e}")
        row["oracles"] = "ok"
        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            fxslim.export_onnx(small, x, Path(tmp) / "m.onnx", simplify=False)
        row["export"] = "ok"
    except _Timeout:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded per stage: this is the census
        row[stage] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return row


def table(rows: list[dict]) -> str:
    fam: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        fam[r["family"]].append(r)
    out = ["| family | models | trace | prune | oracles | export | MACs kept (median) | first failure |",
           "|---|---|---|---|---|---|---|---|"]
    totals = np.zeros(5, dtype=int)
    for family, rs in sorted(fam.items()):
        counts = [len(rs)] + [sum(r.get(s) == "ok" for r in rs) for s in STAGES]
        totals += counts
        kept = [r["macs_kept"] for r in rs if r.get("prune") == "ok"]
        fail = next((f"{r['model']}: {s} - {r[s]}" for r in rs for s in (*STAGES, "build")
                     if r.get(s) not in (None, "ok")), "")
        median = f"{np.median(kept):.2f}" if kept else "-"
        out.append(f"| {family} | {' | '.join(map(str, counts))} | {median} | {fail.replace('|', '/')} |")
    out.append("| **all** | " + " | ".join(f"**{c}**" for c in totals) + " | | |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-family", type=int, default=1)
    ap.add_argument("--limit", type=float, default=90.0)
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "timm_table.jsonl"))
    ap.add_argument("--max-minutes", type=float, default=30.0, help="start no model after this (the table "
                    "then covers the families run so far; run again to continue)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    signal.signal(signal.SIGALRM, _alarm)
    path = Path(args.out)
    done = {json.loads(line)["model"]: json.loads(line) for line in path.read_text().splitlines()} \
        if path.exists() else {}
    pairs = candidates(args.per_family)
    t_all = time.perf_counter()
    for family, name in pairs:
        if name in done:
            continue
        if time.perf_counter() - t_all > 60 * args.max_minutes:
            break
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, args.limit)
        try:
            row = run_one(name)
        except _Timeout:
            row = {"model": name, "build": f"over the {args.limit:.0f} s limit"}
        except Exception as exc:  # noqa: BLE001 - a model timm cannot build or run as configured
            row = {"model": name, "build": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        row.update(family=family, seconds=round(time.perf_counter() - t, 1))
        done[name] = row
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        gc.collect()
    rows = [done[n] for _, n in pairs if n in done]
    covered = f"{len({r['family'] for r in rows})} of the {len({f for f, _ in pairs})} families so far"
    OUT.write_text(
        "# timm's model list through fxslim\n\n"
        f"Generated by `python -m bench.timm_table --per-family {args.per_family} --limit {args.limit:.0f}` "
        f"(timm {__import__('timm').__version__}, torch {torch.__version__}; {sum(r.get('seconds', 0) for r in rows) / 60:.0f} "
        "minutes of model time in all, 2 threads). Per timm module, the model(s) whose names mark them smallest "
        "(atto, nano, tiny, small, b0 ..., then the shortest name); random init, batch 1 at "
        "64 px where the model takes it. Columns count models that passed each stage in order (trace equals the "
        "model; prune(0.5) through the class-keeping default keeps fewer MACs; slicing and dead-channel oracles; "
        "verified ONNX export of the pruned model). Each model's row, including which stage failed and why, is "
        "in the JSONL the command writes. Coverage: " + covered + ".\n\n" + table(rows) + "\n")


if __name__ == "__main__":
    main()
