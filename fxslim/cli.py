"""The `fxslim` command (also ``python -m fxslim``).

    fxslim demo [--ratio 0.5]                       the main job on the built-in digits model
    fxslim groups torchvision:resnet18 --shape 1,3,224,224
    fxslim prune  torchvision:resnet18 --shape 1,3,224,224 --ratio 0.5 --ignore fc
    fxslim run    examples/digits.yaml [--out runs/digits] [--dry-run]

Arguments are parsed and checked before torch is imported, so ``--help`` is instant and a
bad ratio, shape or model spec is one line on stderr (exit status 2) before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fxslim.errors import FxslimError

__all__ = ["main"]

_EXAMPLES = {
    "demo": "examples:\n  fxslim demo\n  fxslim demo --ratio 0.7 --finetune 3 --threads 1",
    "groups": "examples:\n  fxslim groups torchvision:resnet18\n  fxslim groups digits --shape 1,1,8,8 --json",
    "prune": "examples:\n  fxslim prune torchvision:resnet50 --ratio 0.5 --ignore fc\n"
             "  fxslim prune runs/x/steps/02-prune/model --arch digits --shape 1,1,8,8 --ratio 0.3",
    "run": "examples:\n  fxslim run examples/digits.yaml\n  fxslim run examples/digits.yaml --dry-run\n"
           "  fxslim run pipeline.toml --out runs/mine",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1) (the share of channels to remove)")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def _shape(text: str) -> tuple[int, ...]:
    from fxslim.pipeline.specs import parse_shape

    try:
        return parse_shape(text)
    except FxslimError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_spec(text: str) -> str:
    from fxslim.pipeline.specs import check_model_spec

    try:
        check_model_spec(text)
    except FxslimError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _Progress:
    """One line per stage on stderr with its time, for commands that take a while."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def _setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _model(args: argparse.Namespace, say: _Progress) -> Any:
    from fxslim.pipeline.specs import resolve_model

    say(f"loading {args.model}")
    return resolve_model(args.model, getattr(args, "arch", None))


def _inputs(args: argparse.Namespace) -> Any:
    import torch

    from fxslim.pipeline.specs import BUILTIN

    shape = args.shape or (BUILTIN[args.model][2] if args.model in BUILTIN else
                           BUILTIN[args.arch][2] if getattr(args, "arch", None) in BUILTIN else (1, 3, 224, 224))
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def cmd_demo(args: argparse.Namespace) -> int:
    import copy

    import torch

    import fxslim
    from fxslim.runtime.compare import compare
    from fxslim.runtime.examples import DigitsResNet, accuracy, digits_loaders, fit

    say = _Progress()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train, val = digits_loaders(seed=args.seed)
    say(f"training DigitsResNet for {args.epochs} epochs ({args.threads} thread(s))")
    model = fit(DigitsResNet(), train, epochs=args.epochs, lr=3e-3, seed=args.seed)  # lr given: a fast demo
    x = torch.randn(1, 1, 8, 8)
    say(f"pruning {args.ratio:.0%} of every channel group")
    small = fxslim.prune(model, x, args.ratio, ignore=["fc"])
    acc0, acc1 = accuracy(model, val), accuracy(small, val)
    tuned = None
    if args.finetune:
        from fxslim.passes.distill import distill

        say(f"distilling the pruned model for {args.finetune} epochs")
        tuned = distill(copy.deepcopy(small), model, train, val, epochs=args.finetune, lr=2e-3,
                        seed=args.seed, progress=sys.stderr.isatty()).student
    say("measuring latency")
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

    say = _Progress(args.json)
    model = _model(args, say)
    say("tracing and analysing")
    groups = fxslim.channel_groups(model, _inputs(args))
    if args.json:
        print(json.dumps([{"id": g.id, "size": g.size, "prunable": g.prunable,
                           "pinned": g.reason, "text": str(g)}
                          for g in groups], indent=1))
    else:
        for g in groups:
            print(g)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import fxslim
    from fxslim.runtime.compare import compare
    from fxslim.runtime.measure import count_macs, count_params, measure_latency

    say = _Progress(args.json)
    model = _model(args, say)
    x = _inputs(args)
    say(f"tracing and pruning {args.ratio:.0%} of every channel group")
    small = fxslim.prune(model, x, args.ratio, ignore=args.ignore)
    say(f"measuring ({args.runs} runs, {args.threads} thread(s))")
    if args.json:
        row = {}
        for name, m in (("original", model), ("pruned", small)):
            lat = measure_latency(m, x, runs=args.runs, threads=args.threads)
            row[name] = {"params": count_params(m), "macs": count_macs(m, x),
                         "torch_p50_ms": lat["median_ms"], "torch_p90_ms": lat["p90_ms"]}
        print(json.dumps(row, indent=1))
    else:
        print(compare({"original": model, "pruned": small}, x, threads=args.threads, runs=args.runs))
    if args.save:
        fxslim.save(small, args.save)
        say(f"saved to {args.save} (load with fxslim.load, or as a model spec with --arch {args.model})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fxslim.pipeline.config import load_config

    config = load_config(args.config)  # every problem reported before anything runs
    if args.threads is not None:
        config = config.model_copy(update={"threads": args.threads})
    from fxslim.pipeline.runner import run_pipeline

    out = run_pipeline(config, args.out, dry_run=args.dry_run, force=args.force,
                       log=None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
    if args.dry_run:
        print(out)
    else:
        print(f"run directory: {out}")
    return 0


def _build() -> argparse.ArgumentParser:
    from fxslim import __version__

    p = _Parser(prog="fxslim", description="Structured pruning for PyTorch models: prune, distil, export, "
                "measure and report, from the command line or a pipeline config.")
    p.add_argument("--version", action="version", version=f"fxslim {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    def common(q: argparse.ArgumentParser, threads: int | None = 1) -> None:
        default = f"default {threads}" if threads else "default: the config's `threads`, else 1"
        q.add_argument("--threads", type=_positive, default=threads,
                       help=f"torch intra-op threads for the whole command ({default}; "
                            "more threads than free cores is slower, not faster)")

    d = sub.add_parser("demo", help="train, prune, distil and measure the built-in digits model",
                       epilog=_EXAMPLES["demo"], formatter_class=fmt)
    d.add_argument("--ratio", type=_ratio, default=0.5, help="share of channels to remove per group, in [0, 1)")
    d.add_argument("--epochs", type=_positive, default=4, help="training epochs of the original model")
    d.add_argument("--finetune", type=_count, default=2, help="distillation epochs after pruning (0: none)")
    d.add_argument("--seed", type=int, default=0, help="seed for data split, initialisation and training")
    common(d)
    d.set_defaults(fn=cmd_demo)

    model_help = ("model spec: digits, mnist1d, torchvision:NAME[@WEIGHTS], timm:NAME, "
                  "package.module:function, or a saved fxslim directory (with --arch)")
    g = sub.add_parser("groups", help="list channel groups and why some are pinned",
                       epilog=_EXAMPLES["groups"], formatter_class=fmt)
    g.add_argument("model", type=_model_spec, help=model_help)
    g.add_argument("--arch", type=_model_spec, help="the original architecture's spec (for a saved directory)")
    g.add_argument("--shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (default: the "
                   "built-in model's, else 1,3,224,224)")
    g.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")
    common(g)
    g.set_defaults(fn=cmd_groups)

    r = sub.add_parser("prune", help="prune by a uniform ratio and compare",
                       epilog=_EXAMPLES["prune"], formatter_class=fmt)
    r.add_argument("model", type=_model_spec, help=model_help)
    r.add_argument("--arch", type=_model_spec, help="the original architecture's spec (for a saved directory)")
    r.add_argument("--shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (default: the "
                   "built-in model's, else 1,3,224,224)")
    r.add_argument("--ratio", type=_ratio, default=0.5, help="share of channels to remove per group, in [0, 1)")
    r.add_argument("--ignore", nargs="*", default=[], metavar="PATH",
                   help="module paths whose output channels stay whole (e.g. fc)")
    r.add_argument("--runs", type=_positive, default=20, help="timed runs per latency measurement")
    r.add_argument("--save", metavar="DIR", help="save the pruned model (fxslim.save format) to DIR")
    r.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    common(r)
    r.set_defaults(fn=cmd_prune)

    u = sub.add_parser("run", help="run a pipeline config (YAML or TOML) into a run directory",
                       epilog=_EXAMPLES["run"], formatter_class=fmt)
    u.add_argument("config", help="pipeline config file (.yaml, .yml or .toml)")
    u.add_argument("--out", metavar="RUN_DIR", help="run directory (default: the config's `out`, "
                   "else runs/<config name>)")
    u.add_argument("--dry-run", action="store_true", help="check the config and print each step's plan "
                   "(which steps would run, which are up to date); trains nothing")
    u.add_argument("--force", action="store_true", help="re-run every step even when up to date")
    u.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    common(u, threads=None)
    u.set_defaults(fn=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _build().parse_args(argv)
    try:
        if args.threads is not None:
            _setup_threads(args.threads)
        return args.fn(args)
    except FxslimError as exc:
        print(f"fxslim {args.cmd}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
