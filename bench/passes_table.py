"""Rewrite passes composed with pruning, measured side by side on the CPU.

Two tables, written into bench/README.md between markers:

1. torchvision models (random weights, 224x224): original fp32, BatchNorm folded, pruned
   to 1/2 the MACs (uniform L1, widths multiples of 8), pruned + folded, int8, pruned +
   int8, low-rank (vit_b_16: every MLP Linear at half rank). int8 is onnxruntime's
   quantiser on the folded ONNX file (static QDQ, per-channel, 4 random calibration
   images for convolutional models; dynamic for vit_b_16), so it has no torch column.
   bf16 is the original cast to bfloat16 in torch only (onnxruntime's bf16 is not measured).
   Threads pinned to 2; median latency; every variant of a model in one process.
2. The digits model (DigitsResNet, width 16) through the whole chain, seeds 0..2: test
   accuracy per stage (mean, min..max) and latency per stage (seed 0).

    python -m bench.passes_table [--models resnet18 mobilenet_v2 ...] [--b32 resnet18 ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import fxslim
from fxslim.passes.fold_bn import fold_batchnorm
from fxslim.passes.lowrank import LowRankPass
from fxslim.passes.policy import prune_to_macs
from fxslim.passes.quantize import onnx_accuracy, quantize_onnx
from fxslim.runtime.examples import DigitsResNet, accuracy, digits_splits, fit
from fxslim.runtime.measure import count_macs, cpu_info, measure_latency, onnx_latency

HEADS = {
    "resnet18": "fc",
    "resnet50": "fc",
    "mobilenet_v2": "classifier.1",
    "vit_b_16": "heads.head",
}
THREADS = 2
README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- passes_table:begin -->", "<!-- passes_table:end -->"
RUNS = {1: 10, 32: 3}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bfloat16(torch.nn.Module):
    """`model` in bfloat16 behind a float32 interface (inputs cast in, outputs cast out)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


def cpu_line() -> str:
    """The CPU and the instruction sets that decide int8 and bf16 speed."""
    name, flags = cpu_info()
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores; {', '.join(have) or 'no AVX2'}"


def _export(m: torch.nn.Module, x: torch.Tensor, path: Path) -> str:
    return fxslim.export_onnx(m, x, path, simplify=False, tol=1e-3).path


def model_rows(name: str, batches: tuple[int, ...]) -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    t0 = time.perf_counter()
    variants: dict[str, torch.nn.Module] = {"original fp32": model}
    is_vit = name.startswith("vit")
    if not is_vit:  # vit_b_16 has no BatchNorm: folded is the original
        variants["folded"] = fold_batchnorm(model, x)
    pruned, _ = prune_to_macs(model, x, 0.5, ignore=[HEADS[name]], round_to=8)
    variants["pruned 2x MACs"] = pruned
    if not is_vit:
        variants["pruned + folded"] = fold_batchnorm(pruned, x)
    else:
        mlps = [
            n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n
        ]
        variants["low-rank (MLPs half rank)"] = LowRankPass(rank_ratio=0.5, layers=mlps)(
            fxslim.trace(model, x)
        ).module
    tv = dict(variants)  # torch-only variants join after export
    tv["bf16 (torch)"] = Bfloat16(model)
    log(f"{name}: variants built in {time.perf_counter() - t0:.0f} s")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths = {
            k: _export(m, x, Path(d) / f"{i}.onnx") for i, (k, m) in enumerate(variants.items())
        }
        log(f"{name}: exported")
        cal = [
            torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(i))
            for i in range(4)
        ]
        mode = "dynamic" if is_vit else "static"
        made_from = {
            "int8": "original fp32" if is_vit else "folded",
            "pruned + int8": "pruned 2x MACs" if is_vit else "pruned + folded",
        }
        for k, v in made_from.items():
            paths[k] = quantize_onnx(
                paths[v], Path(d) / f"{k[:2]}q.onnx", mode=mode, calibration=cal
            ).path
        log(f"{name}: quantised ({mode})")
        macs = {k: count_macs(m, x) for k, m in variants.items()}
        for bs in batches:
            xb = x.expand(bs, -1, -1, -1).contiguous()
            runs = RUNS.get(bs, 3)
            tl = {
                k: measure_latency(m, xb, runs=runs, warmup=1, threads=THREADS)["median_ms"]
                for k, m in tv.items()
                if k != "bf16 (torch)"
            }
            if bs == 1:  # without bf16 units it is tens of times slower: 3 runs, batch 1 only
                tl["bf16 (torch)"] = measure_latency(
                    tv["bf16 (torch)"], xb, runs=3, warmup=1, threads=THREADS
                )["median_ms"]
            ol = {
                k: onnx_latency(p, xb, threads=THREADS, runs=runs, warmup=1)["median_ms"]
                for k, p in paths.items()
            }
            base_t, base_o = tl["original fp32"], ol["original fp32"]
            for k in [*paths, *(["bf16 (torch)"] if bs == 1 else [])]:
                src = made_from.get(k, "original fp32")
                g = f"{macs[k] / 1e9:.2f}" if k in macs else f"({macs[src] / 1e9:.2f})"
                t = f"{tl[k]:.1f} | {base_t / tl[k]:.2f}x" if k in tl else "- | -"
                o = f"{ol[k]:.1f} | {base_o / ol[k]:.2f}x" if k in ol else "- | -"
                rows.append(f"| {name} | {bs} | {k} | {g} | {t} | {o} |")
                log(rows[-1])
    return rows


def digits_rows(seeds: tuple[int, ...] = (0, 1, 2)) -> tuple[list[str], list[str]]:
    stages = [
        "original fp32",
        "folded",
        "pruned 2x MACs + distil",
        "pruned + folded",
        "int8 (from folded)",
        "pruned + int8",
        "low-rank (half rank) + distil",
        "low-rank (energy 0.9) + distil",
        "bf16 (torch)",
    ]
    acc: dict[str, list[float]] = {s: [] for s in stages}
    lat_rows: list[str] = []
    for seed in seeds:
        torch.manual_seed(seed)
        train, val, test = digits_splits(seed=seed)
        x = next(iter(test))[0][:1]
        t0 = time.perf_counter()
        model = fit(DigitsResNet(width=16), train, epochs=6, lr=3e-3, seed=seed, val=val)
        pruned, _ = prune_to_macs(model, x, 0.5, ignore=["fc"])
        pruned = fxslim.distill(
            pruned, model, train, val, epochs=3, lr=3e-3, seed=seed, progress=False
        ).student
        convs = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
        ]
        low = LowRankPass(rank_ratio=0.5, layers=convs)(fxslim.trace(model, x)).module
        low = fxslim.distill(
            low, model, train, val, epochs=3, lr=3e-3, seed=seed, progress=False
        ).student
        low9 = LowRankPass(energy=0.9, layers=convs)(fxslim.trace(model, x)).module
        low9 = fxslim.distill(
            low9, model, train, val, epochs=3, lr=3e-3, seed=seed, progress=False
        ).student
        mods = {
            "original fp32": model,
            "folded": fold_batchnorm(model, x),
            "pruned 2x MACs + distil": pruned,
            "pruned + folded": fold_batchnorm(pruned, x),
            "low-rank (half rank) + distil": low,
            "low-rank (energy 0.9) + distil": low9,
        }
        torch_only = {"bf16 (torch)": Bfloat16(model)}
        cal = [b for _, b in zip(range(8), train)]
        with tempfile.TemporaryDirectory() as d:
            paths = {
                k: _export(m, x, Path(d) / f"{i}.onnx") for i, (k, m) in enumerate(mods.items())
            }
            paths["int8 (from folded)"] = quantize_onnx(
                paths["folded"], Path(d) / "q.onnx", calibration=cal
            ).path
            paths["pruned + int8"] = quantize_onnx(
                paths["pruned + folded"], Path(d) / "pq.onnx", calibration=cal
            ).path
            for k in stages:
                m = mods.get(k, torch_only.get(k))
                acc[k].append(accuracy(m, test) if m is not None else onnx_accuracy(paths[k], test))
            if seed == seeds[0]:
                macs = {k: count_macs(m, x) for k, m in mods.items()}
                for k in stages:
                    cells = []
                    m = mods.get(k, torch_only.get(k))
                    for bs in (1, 32):
                        xb = x.expand(bs, -1, -1, -1).contiguous()
                        t = (
                            measure_latency(m, xb, runs=50, threads=THREADS)["median_ms"]
                            if m is not None
                            else None
                        )
                        o = (
                            onnx_latency(paths[k], xb, threads=THREADS, runs=50)["median_ms"]
                            if k in paths
                            else None
                        )
                        cells += [f"{v:.3f}" if v is not None else "-" for v in (t, o)]
                    mm = f"{macs[k] / 1e6:.2f}" if k in macs else "-"
                    lat_rows.append(f"| {k} | {mm} | " + " | ".join(cells) + " |")
        log(
            f"digits seed {seed}: {time.perf_counter() - t0:.0f} s; "
            + ", ".join(f"{k} {v[-1]:.4f}" for k, v in acc.items())
        )
    base = acc["original fp32"]
    acc_rows = []
    for k in stages:
        v = [100 * a for a in acc[k]]
        d = [100 * (a - b) for a, b in zip(acc[k], base)]
        acc_rows.append(
            f"| {k} | {statistics.mean(v):.2f} | {min(v):.2f}..{max(v):.2f} | "
            f"{statistics.mean(d):+.2f} ({min(d):+.2f}..{max(d):+.2f}) |"
        )
    return acc_rows, lat_rows


def write(section: str) -> None:
    old = README.read_text()
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + section + old[old.index(END) + len(END) :]
    else:
        at = old.index("\n## Notes") if "\n## Notes" in old else len(old)
        new = old[:at] + "\n" + section + "\n" + old[at:]
    README.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=list(HEADS))
    ap.add_argument("--b32", nargs="*", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--seeds", type=int, default=3, help="digits seeds; 0 skips the digits chain")
    ap.add_argument(
        "--rows-only", type=Path, help="write only the model rows to this file (a second process)"
    )
    args = ap.parse_args()
    start = time.perf_counter()
    acc_rows, lat_rows = digits_rows(tuple(range(args.seeds))) if args.seeds else ([], [])
    rows: list[str] = []
    done: list[str] = []
    for name in [
        None,
        *args.models,
    ]:  # the README is rewritten after every model: a cut run keeps its part
        if name is not None:
            try:
                rows += model_rows(name, (1, 32) if name in args.b32 else (1,))
                done.append(name)
            except Exception as exc:  # noqa: BLE001 - one model failing must not lose the others' rows
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                rows.append(f"| {name} | - | failed: {type(exc).__name__} | | | | | |")
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
        if args.rows_only:
            args.rows_only.write_text("\n".join(rows) + f"\nload: {load}\n")
            continue
        section = SECTION.format(
            minutes=(time.perf_counter() - start) / 60,
            cpu=cpu_line(),
            seeds=args.seeds,
            rows="\n".join(rows),
            acc="\n".join(acc_rows),
            lat="\n".join(lat_rows),
            load=load,
            b32=", ".join(m for m in done if m in args.b32) or "none",
        )
        write(section.strip())
    if not args.rows_only:
        print(section)


SECTION = f"""{BEGIN}
## Rewrite passes composed with pruning: fold, low-rank, int8

`python -m bench.passes_table` ({{minutes:.0f}} min; {{cpu}}). Every variant of a model is
timed back to back in one process, so ratios within a model are the figures to read;
absolute times depend on the machine's load (below). Random weights, 1x3x224x224 (batch 32: the same image repeated), threads
pinned to 2, median of {RUNS[1]} runs at batch 1 and {RUNS[32]} at batch 32. GMACs in parentheses:
the float model the int8 file was made from. int8 = onnxruntime's quantiser on the
folded ONNX file: static QDQ, per-channel weights, 4 random calibration images (vit_b_16:
dynamic); it exists only as an ONNX file, so it has no torch column. bf16 is the original
cast to bfloat16 in torch (inputs cast in, outputs out); onnxruntime's bf16 is not measured,
so it has no onnxruntime column. "pruned" is uniform
L1 pruning bisected to 1/2 the MACs, widths multiples of 8. Batch 32 measured for: {{b32}}
(bf16 at batch 1 only, median of 3 runs).
Load average (1/5/15 min) when the table was last written: {{load}} on 2 cores.

| model | batch | variant | GMACs | torch ms | torch speed-up | onnxruntime ms | ort speed-up |
|---|---|---|---|---|---|---|---|
{{rows}}

### The digits model through the whole chain

DigitsResNet (width 16, 6 epochs) on scikit-learn's digits, 60/20/20 split per seed,
test accuracy over {{seeds}} seeds (0, 1, ...; mean, min..max, and the per-seed change from the
fp32 original). Pruned: 1/2 the MACs then `fxslim.distill` 3 epochs from the original;
low-rank: every 3x3 conv at half rank (`LowRankPass(rank_ratio=0.5)`), or at the rank that
keeps 90% of each layer's singular-value energy (`energy=0.9`), then 3 epochs of
distillation; int8: static QDQ per-channel, 8 training batches as calibration; bf16: the
original cast to bfloat16 in torch.

| stage | test accuracy % | min..max | change vs fp32 (min..max) |
|---|---|---|---|
{{acc}}

Latency per stage (seed 0, 2 threads, median of 50 runs, ms):

| stage | MMACs | torch b1 | onnxruntime b1 | torch b32 | onnxruntime b32 |
|---|---|---|---|---|---|
{{lat}}
{END}"""


if __name__ == "__main__":
    main()
