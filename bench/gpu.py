"""GPU checks and throughput, under 5 minutes on one GPU (issue 17's CUDA items).

    python -m bench.gpu                  # on a CUDA machine: writes its section of bench/README.md
    python -m bench.gpu --device cpu --smoke   # the same code paths, tiny, on the CPU (no file written)

1. distillation with mixed precision on and off (float16 autocast + GradScaler on CUDA),
   with feature KD, on the built-in digits model: validation accuracy and time;
2. distillation under a one-process nccl group (gloo on the CPU), where every epoch ends
   in an all-reduce of its metrics;
3. `fxslim.prune` of a model that lives on the GPU (the result stays there);
4. throughput (images/s, float16 on CUDA, batch 128) of resnet50, mobilenet_v2 and
   vit_b_16: original, `prune(ratio=0.5)`, and `round_to=8`, contiguous and channels-last.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision

import fxslim
from fxslim.passes.distill import distill
from fxslim.runtime.examples import DigitsResNet, accuracy, digits_loaders, fit

README = Path(__file__).with_name("README.md")
BEGIN, END = "<!-- bench.gpu begin -->", "<!-- bench.gpu end -->"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distillation_rows(dev: str, epochs: int) -> list[str]:
    train, val = digits_loaders(seed=0)
    teacher = fit(DigitsResNet(), train, epochs=epochs, seed=0).to(dev).eval()
    small = fxslim.prune(teacher, torch.randn(1, 1, 8, 8, device=dev), 0.5, ignore=["fc"])
    rows = []
    amps = (False, True) if dev.startswith("cuda") else (False,)
    for amp in amps:
        for feats in (None, ["block1.0"]):
            t0 = time.perf_counter()
            res = distill(copy.deepcopy(small), teacher, train, val, epochs=epochs, device=dev, amp=amp,
                          features=feats, progress=False)
            acc = accuracy(res.student, val)
            rows.append(f"| distill, amp {'on' if amp else 'off'}, feature KD {'on' if feats else 'off'} | "
                        f"val acc {acc:.3f} | {time.perf_counter() - t0:.1f} s |")
    return rows


def distributed_row(dev: str) -> str:
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group(backend)
    try:
        train, val = digits_loaders(seed=0)
        teacher = DigitsResNet(width=16).to(dev).eval()
        t0 = time.perf_counter()
        res = distill(DigitsResNet(width=8), teacher, train, val, epochs=2, device=dev, progress=False)
        return (f"| distill under a 1-process {backend} group | {len(res.history)} epochs, "
                f"val acc {res.history[-1]['val_accuracy']:.3f} | {time.perf_counter() - t0:.1f} s |")
    finally:
        dist.destroy_process_group()


def prune_row(dev: str, size: int) -> str:
    model = torchvision.models.resnet18().to(dev).eval()
    x = torch.randn(1, 3, size, size, device=dev)
    t0 = time.perf_counter()
    small = fxslim.prune(model, x, 0.5, ignore=["fc"])
    where = {p.device.type for p in small.parameters()}
    with torch.inference_mode():
        out = small(x)
    return (f"| prune resnet18 living on {dev} | parameters on {sorted(where)}, output on "
            f"{out.device.type} | {time.perf_counter() - t0:.2f} s |")


def _images_per_s(model: torch.nn.Module, x: torch.Tensor, runs: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(runs + 3):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times)


def throughput_rows(dev: str, batch: int, size: int, runs: int) -> list[str]:
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    rows = []
    for name in ("resnet50", "mobilenet_v2", "vit_b_16"):
        s = 224 if name.startswith("vit") else size
        model = torchvision.models.get_model(name).to(dev).eval()
        probe = torch.randn(1, 3, s, s, device=dev)
        head = "heads.head" if name.startswith("vit") else ("fc" if name == "resnet50" else "classifier.1")
        variants = {
            "original": model,
            "prune 0.5": fxslim.prune(model, probe, 0.5, ignore=[head]),
            "prune 0.5, round_to=8": fxslim.prune(model, probe, 0.5, ignore=[head], round_to=8),
        }
        macs0 = fxslim.count_macs(model, probe)
        base = None
        for label, m in variants.items():
            kept = fxslim.count_macs(m, probe) / macs0
            m.to(dtype)  # in place, like every Module.to
            for fmt in ("contiguous", "channels-last"):
                if fmt == "channels-last" and name.startswith("vit"):
                    continue
                x = torch.randn(batch, 3, s, s, device=dev, dtype=dtype)
                if fmt == "channels-last":
                    m.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                ips = _images_per_s(m, x, runs)
                base = base or ips
                rows.append(f"| {name} | {label} | {fmt} | {kept:.3f} | {ips:.0f} | {ips / base:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the code paths, write nothing")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; nothing was measured (try --device cpu --smoke)")
        return
    small = args.smoke
    t0 = time.perf_counter()
    checks = distillation_rows(args.device, 1 if small else 4)
    checks.append(distributed_row(args.device))
    checks.append(prune_row(args.device, 32 if small else 224))
    thr = throughput_rows(args.device, 2 if small else 128, 32 if small else 224, 2 if small else 30)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    text = "\n".join([
        (f"{BEGIN}\n## GPU\n\n`python -m bench.gpu` on {name}, torch {torch.__version__} "
        f"({time.perf_counter() - t0:.0f} s in all).\n"),
        "| check | result | time |", "|---|---|---|", *checks, "",
        (f"Throughput, {'float16' if args.device.startswith('cuda') else 'float32'}, batch "
        f"{2 if small else 128}, median of {2 if small else 30} runs (vit_b_16 has no convolutions: "
        "no channels-last rows):\n"),
        "| model | variant | layout | MACs kept | images/s | vs first row |", "|---|---|---|---|---|---|",
        *thr, END,
    ])
    print(text)
    if small:
        return
    old = README.read_text()
    if BEGIN in old:
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, old, flags=re.DOTALL)
    else:
        new = old.replace("\n## Notes", f"\n{text}\n\n## Notes", 1)
    README.write_text(new)


if __name__ == "__main__":
    main()
