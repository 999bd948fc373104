"""The `fxslim` command.

    fxslim demo [--ratio 0.5]                       the main job on the built-in digits model
    fxslim groups torchvision:resnet18 --shape 1,3,224,224
    fxslim prune  torchvision:resnet18 --shape 1,3,224,224 --ratio 0.5 --ignore fc
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from fxslim.errors import FxslimError

__all__ = ["main"]


def _load_model(spec: str) -> torch.nn.Module:
    if spec.startswith("torchvision:"):
        import torchvision

        return torchvision.models.get_model(spec.split(":", 1)[1]).eval()
    raise FxslimError(f"unknown model spec '{spec}' (use torchvision:<name>)")


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(","))


def cmd_demo(args: argparse.Namespace) -> int:
    import fxslim
    from fxslim.runtime.compare import compare
    from fxslim.runtime.examples import DigitsResNet, accuracy, digits_loaders, fit

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train, val = digits_loaders(seed=args.seed)
    model = fit(DigitsResNet(), train, epochs=args.epochs, lr=3e-3, seed=args.seed)  # lr given: a fast demo
    x = torch.randn(1, 1, 8, 8)
    small = fxslim.prune(model, x, args.ratio, ignore=["fc"])
    acc0, acc1 = accuracy(model, val), accuracy(small, val)
    tuned = None
    if args.finetune:
        from fxslim.passes.distill import distill

        tuned = distill(copy.deepcopy(small), model, train, val, epochs=args.finetune, lr=2e-3,
                        seed=args.seed, progress=False).student
    models = {"original": model, f"pruned {args.ratio:.0%}": small}
    extra = {"original": {"val acc": f"{acc0:.3f}"}, f"pruned {args.ratio:.0%}": {"val acc": f"{acc1:.3f}"}}
    if tuned is not None:
        models[f"pruned + {args.finetune} ep distillation"] = tuned
        extra[f"pruned + {args.finetune} ep distillation"] = {"val acc": f"{accuracy(tuned, val):.3f}"}
    print(f"fxslim demo: DigitsResNet on sklearn digits (1797 8x8 images), prune ratio {args.ratio}")
    print(compare(models, x, threads=1, runs=200, extra=extra))
    print(f"({time.perf_counter() - t0:.1f} s; latency: batch 1, torch eager, 1 thread)")
    return 0


def cmd_groups(args: argparse.Namespace) -> int:
    import fxslim

    model = _load_model(args.model)
    for g in fxslim.channel_groups(model, torch.randn(*_shape(args.shape))):
        print(g)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import fxslim
    from fxslim.runtime.compare import compare

    model = _load_model(args.model)
    x = torch.randn(*_shape(args.shape))
    small = fxslim.prune(model, x, args.ratio, ignore=args.ignore)
    print(compare({"original": model, "pruned": small}, x, threads=args.threads, runs=args.runs))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxslim", description="structured pruning for PyTorch models")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train, prune, distil and measure the built-in digits model")
    d.add_argument("--ratio", type=float, default=0.5)
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--finetune", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)
    g = sub.add_parser("groups", help="list channel groups and why some are pinned")
    g.add_argument("model")
    g.add_argument("--shape", default="1,3,224,224")
    g.set_defaults(fn=cmd_groups)
    r = sub.add_parser("prune", help="prune by a uniform ratio and compare")
    r.add_argument("model")
    r.add_argument("--shape", default="1,3,224,224")
    r.add_argument("--ratio", type=float, default=0.5)
    r.add_argument("--ignore", nargs="*", default=[])
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--runs", type=int, default=20)
    r.set_defaults(fn=cmd_prune)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except FxslimError as exc:
        print(f"fxslim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
