"""Pass time, fxslim vs torch-pruning: trace + analysis + prune(ratio=0.5), side by side.
fxslim is timed as users call it (the class-keeping default, its proof included) and with
``keep_classes=False`` (the GraphModule, no proof).

Both tools get the same model (random init, eval), the same 1x3x224x224 input, the same
ratio, L1 magnitude importance and the classifier head ignored. Runs alternate between
the tools in one process with pinned threads; the median of `repeats` runs is reported.

    python -m bench.prune_speed            # prints the markdown table
"""

from __future__ import annotations

import copy
import signal
import statistics
import sys
import time

import torch
import torchvision

import fxslim

MODELS = {
    "resnet18": "fc",
    "resnet50": "fc",
    "mobilenet_v2": "classifier.1",
    "densenet121": "classifier",
    "vit_b_16": "heads.head",
    "efficientnet_b0": "classifier.1",
    "swin_t": "head",
    "deit_tiny_patch16_224": "head",  # timm
}
# the five models of the pass-time ruling (and of the pytest-benchmark suite that CI runs once)
RULED = ("resnet18", "resnet50", "mobilenet_v2", "densenet121", "vit_b_16")


def run_fxslim(model: torch.nn.Module, x: torch.Tensor, head: str, keep_classes: bool = True) -> torch.nn.Module:
    return fxslim.prune(model, x, 0.5, ignore=[head], keep_classes=keep_classes)


def run_torch_pruning(model: torch.nn.Module, x: torch.Tensor, head: str) -> torch.nn.Module:
    import torch_pruning as tp

    m = model  # torch-pruning edits in place: callers pass a copy
    kw = {}
    mha = [mm for mm in m.modules() if isinstance(mm, torch.nn.MultiheadAttention)]
    if mha:
        kw["num_heads"] = {mm: mm.num_heads for mm in mha}
    qkv = {mm.qkv: mm.num_heads for mm in m.modules() if hasattr(mm, "qkv") and hasattr(mm, "num_heads")}
    if qkv:  # timm attention and torchvision Swin: whole heads, as fxslim prunes them
        kw.update(num_heads=qkv, prune_num_heads=True, prune_head_dims=False)
    pruner = tp.pruner.BasePruner(
        m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=[m.get_submodule(head)], **kw,
    )
    pruner.step()
    return m


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("deit"):
        import timm

        return timm.create_model(name, pretrained=False).eval()
    return torchvision.models.get_model(name).eval()


class _Stopped(Exception):
    pass


def _stop(signum, frame):
    raise _Stopped


def measure(name: str, repeats: int = 5, tp_limit: float = 120.0) -> dict[str, float]:
    """Median seconds of each tool; torch-pruning runs at most `tp_limit` seconds (then "tp_s" is None)."""
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    head = MODELS[name]
    fx_t, graph_t, tp_t = [], [], []
    victim = None
    signal.signal(signal.SIGALRM, _stop)
    for _ in range(repeats):
        t0 = time.perf_counter()
        small = run_fxslim(model, x, head)
        fx_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_fxslim(model, x, head, keep_classes=False)
        graph_t.append(time.perf_counter() - t0)
        if tp_t is None:
            continue
        victim = copy.deepcopy(model)  # not timed
        signal.setitimer(signal.ITIMER_REAL, tp_limit)
        t0 = time.perf_counter()
        try:
            run_torch_pruning(victim, x, head)
            tp_t.append(time.perf_counter() - t0)
        except _Stopped:  # torch-pruning 1.6 on torchvision's efficientnet_b0 grows past 10 GB here
            tp_t, victim = None, None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return {
        "fxslim_s": statistics.median(fx_t),
        "graph_s": statistics.median(graph_t),
        "tp_s": statistics.median(tp_t) if tp_t else None,
        "tp_limit": tp_limit,
        "fx_params": sum(p.numel() for p in small.parameters()),
        "tp_params": sum(p.numel() for p in victim.parameters()) if victim is not None else None,
        "params": sum(p.numel() for p in model.parameters()),
    }


def table(names=tuple(MODELS), repeats: int = 9) -> str:
    torch.set_num_threads(2)
    rows = [("| model | fxslim (ms) | torch-pruning (ms) | fxslim / torch-pruning | fxslim, keep_classes=False (ms) "
            "| its ratio | params after (fxslim / tp / original, M) |"),
            "|---|---|---|---|---|---|---|"]
    for name in names:
        r = measure(name, repeats)
        if r["tp_s"] is None:
            tp, ratio, graph_ratio, tp_params = f"stopped at {r['tp_limit']:.0f} s", "-", "-", "-"
        else:
            tp, ratio = f"{r['tp_s'] * 1e3:.0f}", f"{r['fxslim_s'] / r['tp_s']:.2f}"
            graph_ratio, tp_params = f"{r['graph_s'] / r['tp_s']:.2f}", f"{r['tp_params'] / 1e6:.2f}"
        rows.append(f"| {name} | {r['fxslim_s'] * 1e3:.0f} | {tp} | {ratio} | {r['graph_s'] * 1e3:.0f} | {graph_ratio} | "
                    f"{r['fx_params'] / 1e6:.2f} / {tp_params} / {r['params'] / 1e6:.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1:] or tuple(MODELS)))
