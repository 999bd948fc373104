"""The `fxslim` command (also ``python -m fxslim``).

    fxslim demo [--ratio 0.5]                       the main job on the built-in digits model
    fxslim groups  torchvision:resnet18 --shape 1,3,224,224
    fxslim prune   torchvision:resnet18 --ratio 0.5 --ignore fc [--save DIR]
    fxslim distill STUDENT --teacher TEACHER [--data SPEC] -o DIR
    fxslim export  MODEL -o model.onnx
    fxslim bench   MODEL [MODEL ...] [--onnx FILE ...] [-o bench.json]
    fxslim report  BEFORE [AFTER ...] -o DIR
    fxslim run     examples/digits.yaml [--out runs/digits] [--dry-run]
    fxslim advise  digits --targets 0.5 0.25 --kind latency --epochs 3 -o advice
    fxslim llm-prune CHECKPOINT_DIR OUT_DIR --heads 0.25 --mlp 0.5 [--calib FILE]

Every subcommand takes the pipeline's model specs and prints text, or with ``--json`` one
JSON object on stdout (progress lines and bars go to stderr). distill / export / bench /
report run the pipeline's own step implementations (`fxslim.pipeline.oneshot`).
Arguments are parsed and checked before torch is imported, so ``--help`` is instant and a
bad ratio, shape, spec, option or output path is one line on stderr (exit status 2)
before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from fxslim.errors import FxslimError

__all__ = ["main"]

_RUN = "runs/digits/steps"  # the run directory of `fxslim run examples/digits.yaml`
_EXAMPLES = {
    "demo": "examples:\n  fxslim demo\n  fxslim demo --ratio 0.7 --finetune 3 --threads 1 --json",
    "groups": "examples:\n  fxslim groups torchvision:resnet18\n  fxslim groups digits --shape 1,1,8,8 --json",
    "prune": "examples:\n  fxslim prune torchvision:resnet50 --ratio 0.5 --ignore fc\n"
             f"  fxslim prune {_RUN}/01-finetune/model --arch digits --ratio 0.3 --save small --json",
    "distill": "examples (after `fxslim run examples/digits.yaml`):\n"
               f"  fxslim distill {_RUN}/02-prune/model --arch digits \\\n"
               f"      --teacher {_RUN}/01-finetune/model --epochs 3 -o distilled\n"
               "  fxslim distill pruned/ --arch mypkg.nets:net --teacher mypkg.nets:trained_net \\\n"
               "      --data mypkg.data:loaders --shape 1,3,224,224 -o distilled --json",
    "export": "examples:\n  fxslim export torchvision:resnet18 -o resnet18.onnx\n"
              "  fxslim export distilled/model --arch digits -o digits.onnx --opset 18 --json",
    "bench": "examples:\n  fxslim bench torchvision:resnet18 --batch-sizes 1 8 --runs 50\n"
             f"  fxslim bench {_RUN}/01-finetune/model distilled/model --arch digits \\\n"
             "      --onnx - digits.onnx -o bench.json --json",
    "report": "examples:\n"
              f"  fxslim report {_RUN}/01-finetune/model distilled/model --arch digits -o report\n"
              "  fxslim report torchvision:resnet18 small --arch torchvision:resnet18 --runs 20 -o report --json",
    "advise": "examples:\n  fxslim advise digits --epochs 2 --seeds 0 1 -o advice-digits\n"
              "  fxslim advise mnist1d --targets 0.5 0.25 --kind latency --epochs 6 --seeds 0 1 2 -o advice\n"
              "  fxslim advise mypkg.nets:trained --data mypkg.data:loaders --kind macs -o advice --json",
    "llm-prune": "examples:\n  fxslim llm-prune llama-2-7b llama-2-7b-pruned --heads 0.25 --mlp 0.5\n"
                 "  fxslim llm-prune llama-2-7b pruned --calib wiki.txt --importance flap --json",
    "run": "examples:\n  fxslim run examples/digits.yaml\n  fxslim run examples/digits.yaml --dry-run\n"
           "  fxslim run pipeline.toml --out runs/mine --json",
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


def _spec(check: str):
    """An argparse type: the text, once `fxslim.pipeline.specs.<check>` accepts its form."""

    def parse(text: str) -> str:
        from fxslim.pipeline import specs

        try:
            getattr(specs, check)(text)
        except FxslimError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return parse


_model_spec, _data_spec = _spec("check_model_spec"), _spec("check_data_spec")


def _target(text: str) -> float:
    v = _number(text)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a target: give a fraction of the original in (0, 1)")
    return v


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _setup_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


_MODEL_HELP = ("model spec: digits, mnist1d, torchvision:NAME[@WEIGHTS], timm:NAME, "
               "package.module:function, or a saved fxslim directory (with --arch)")


def _build() -> argparse.ArgumentParser:
    from fxslim import __version__

    p = _Parser(prog="fxslim", description="Structured pruning for PyTorch models: prune, distil, export, "
                "measure and report, from the command line or a pipeline config.")
    p.add_argument("--version", action="version", version=f"fxslim {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, threads: int | None = 1) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help, description=help, epilog=_EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        default = (f"default {threads}" if threads else "default: the config's `threads`, else 1" if name == "run"
                   else "default: torch's, every core")
        q.add_argument("--threads", type=_positive, default=threads,
                       help=f"torch intra-op threads for the whole command ({default}; "
                            "more threads than free cores is slower, not faster)")
        q.add_argument("--json", action="store_true", help="print one JSON object on stdout for scripts "
                       "(progress stays on stderr)")
        q.add_argument("--quiet", action="store_true", help="no progress lines or bars on stderr")
        return q

    def model(q: argparse.ArgumentParser, many: bool = False, shape: bool = True) -> None:
        if many:
            q.add_argument("model", nargs="+", type=_model_spec, metavar="MODEL", help=_MODEL_HELP + "; several "
                           "are compared, the first as 'before'")
        else:
            q.add_argument("model", type=_model_spec, help=_MODEL_HELP)
        q.add_argument("--arch", type=_model_spec, help="the original architecture's spec (for a saved directory)")
        q.add_argument("--shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (default: the "
                       "built-in model's; else, with --data, one example of its first batch; else 1,3,224,224)")

    def output(q: argparse.ArgumentParser, what: str, required: bool = True) -> None:
        q.add_argument("-o", "--out", required=required, metavar="PATH", help=f"where to write {what}; it "
                       "appears only once complete")
        q.add_argument("--force", action="store_true", help="replace an existing output (a folder only if an "
                       "fxslim command wrote it)")

    d = command("demo", "train, prune, distil and measure the built-in digits model")
    d.add_argument("--ratio", type=_ratio, default=0.5, help="share of channels to remove per group, in [0, 1)")
    d.add_argument("--epochs", type=_positive, default=4, help="training epochs of the original model")
    d.add_argument("--finetune", type=_count, default=2, help="distillation epochs after pruning (0: none)")
    d.add_argument("--seed", type=int, default=0, help="seed for data split, initialisation and training")

    g = command("groups", "list channel groups and why some are pinned")
    model(g)

    r = command("prune", "prune by a uniform ratio and compare")
    model(r)
    r.add_argument("--ratio", type=_ratio, default=0.5, help="share of channels to remove per group, in [0, 1)")
    r.add_argument("--ignore", nargs="*", default=[], metavar="PATH",
                   help="module paths whose output channels stay whole (e.g. fc)")
    r.add_argument("--runs", type=_positive, default=20, help="timed runs per latency measurement")
    r.add_argument("--save", metavar="DIR", help="save the pruned model (fxslim.save format) to DIR")
    r.add_argument("--force", action="store_true", help="replace an earlier fxslim save at --save DIR")

    t = command("distill", "distil a (pruned) student from a teacher; writes DIR/model, DIR/step.json")
    model(t)
    t.add_argument("--teacher", type=_model_spec, required=True, help="the teacher's model spec (a saved "
                   "directory is resolved with --arch too)")
    t.add_argument("--data", type=_data_spec, help="data spec: digits, mnist1d or package.module:function "
                   "returning (train_loader, val_loader) (default: the built-in model's)")
    t.add_argument("--epochs", type=_positive, default=2, help="distillation epochs (default 2)")
    t.add_argument("--lr", type=_number, help="learning rate (default 2e-3)")
    t.add_argument("--alpha", type=_number, help="weight of the soft (teacher) loss, in [0, 1] (default 0.9)")
    t.add_argument("--temperature", type=_number, help="softmax temperature (default 4)")
    t.add_argument("--features", nargs="*", metavar="PATH", help="module paths whose features are matched too")
    t.add_argument("--seed", type=int, default=0, help="seed for data order and training")
    output(t, "the distilled model's folder (DIR/model is a saved fxslim directory)")

    e = command("export", "export to ONNX, verified against torch in onnxruntime")
    model(e)
    e.add_argument("--opset", type=_positive, help="ONNX opset (default: the exporter's)")
    e.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    e.add_argument("--tol", type=_number, help="largest allowed scaled difference to torch (default 1e-4)")
    output(e, "the .onnx file")

    b = command("bench", "measure latency p50/p90 in torch (and onnxruntime with --onnx)")
    model(b, many=True)
    b.add_argument("--onnx", nargs="+", metavar="FILE", help="each model's exported .onnx file, in the order "
                   "of the models ('-' for none): adds onnxruntime latency")
    b.add_argument("--batch-sizes", nargs="+", type=_positive, default=[1], metavar="N", help="default 1")
    b.add_argument("--runs", type=_positive, default=30, help="timed runs per measurement (default 30)")
    b.add_argument("--warmup", type=_count, default=5, help="untimed runs first (default 5)")
    output(b, "the measurements as JSON (default: only printed)", required=False)

    o = command("report", "the Markdown + HTML report comparing models (before first)")
    model(o, many=True)
    o.add_argument("--data", type=_data_spec, help="labelled data spec for accuracy, precision, recall, F1 and "
                   "the confusion matrix (default: the built-in model's)")
    o.add_argument("--runs", type=_count, default=0, help="timed runs for latency in the report (0: none)")
    o.add_argument("--title", help="the report's title")
    o.add_argument("--seed", type=int, default=0, help="the data's seed (a run's `seed`: it splits the data)")
    output(o, "the report's folder (report.md, report.html, PNGs)")

    u = command("run", "run a pipeline config (YAML or TOML) into a run directory", threads=None)
    u.add_argument("config", help="pipeline config file (.yaml, .yml or .toml)")
    u.add_argument("--out", metavar="RUN_DIR", help="run directory (default: the config's `out`, "
                   "else runs/<config name>)")
    u.add_argument("--dry-run", action="store_true", help="check the config and print each step's plan "
                   "(which steps would run, which are up to date); trains nothing")
    u.add_argument("--force", action="store_true", help="re-run every step even when up to date")
    a = command("advise", "prune, distil or both, and how far: every recipe at every target, measured "
                "(table, Pareto front, recommendation, plots, saved models in DIR)")
    model(a)
    a.add_argument("--data", type=_data_spec, help="data spec: digits, mnist1d or package.module:function "
                   "returning (train_loader, val_loader) (default: the built-in model's)")
    a.add_argument("--targets", nargs="+", type=_target, default=[0.5, 0.25], metavar="F",
                   help="fractions of the original's latency / MACs / params (default 0.5 0.25)")
    a.add_argument("--kind", choices=["latency", "macs", "params"], default="latency",
                   help="what the targets are fractions of (default latency, measured)")
    a.add_argument("--epochs", type=_positive, default=3, help="training budget of every recipe (default 3)")
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S", help="default 0 1 2")
    a.add_argument("--train-epochs", type=_count, help="first train the original with labels for this many "
                   "epochs (default: 4 for the untrained built-in models, else 0: the model is trained)")
    a.add_argument("--lr", type=_number, help="one learning rate for every recipe (default: each recipe "
                   "chooses its own by short trials)")
    a.add_argument("--ignore", nargs="*", default=[], metavar="PATH", help="module paths whose output "
                   "channels stay whole")
    a.add_argument("--latency-runs", type=_positive, default=50, help="timed runs per architecture (default 50)")
    a.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime export and latency")
    a.add_argument("-o", "--out", required=True, metavar="DIR", help="the advisor's folder: new, empty, or an "
                   "earlier advisor folder (finished runs are skipped)")
    lp = command("llm-prune", "prune heads and MLP channels of a sharded LLM checkpoint, streamed tensor by tensor "
                 "(a 7B model in a few GB of memory)", threads=None)
    lp.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a Hugging Face checkpoint folder (config.json "
                    "and safetensors shards)")
    lp.add_argument("out", metavar="OUT_DIR", help="the pruned checkpoint's folder; it appears only once complete")
    lp.add_argument("--heads", type=_ratio, default=0.25, help="share of (key/value) heads removed per layer")
    lp.add_argument("--mlp", type=_ratio, default=0.5, help="share of MLP channels removed per layer")
    lp.add_argument("--importance", choices=["magnitude", "wanda", "flap"], help="default: wanda with --calib, "
                    "else magnitude")
    lp.add_argument("--calib", metavar="FILE", help="calibration text for wanda/flap (default: the built-in "
                    "stdlib text), tokenized by the checkpoint's tokenizer")
    lp.add_argument("--calib-tokens", type=_shape, default=(32, 128), metavar="N,SEQ",
                    help="calibration windows and their length (default 32,128)")
    lp.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    for q in (e, b, a):
        q.set_defaults(seed=0)
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone, still before any work."""
    from pathlib import Path

    from fxslim.pipeline.specs import check_model_spec

    specs = list(args.model) if isinstance(getattr(args, "model", None), list) else [getattr(args, "model", None)]
    specs += [getattr(args, "teacher", None)]
    for spec in filter(None, specs):
        if check_model_spec(spec) == "saved" and not args.arch:
            p.error(f"'{spec}' is a saved fxslim directory: give --arch, the original architecture's spec")
    if args.cmd == "llm-prune":
        if not (Path(args.checkpoint) / "config.json").is_file():
            p.error(f"'{args.checkpoint}' is not a Hugging Face checkpoint folder (no config.json)")
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
            p.error(f"'{args.out}' exists and is not an empty folder (give --force to replace it)")
        if args.calib and not Path(args.calib).is_file():
            p.error(f"--calib: '{args.calib}' is not a file")
        if args.importance == "magnitude" and args.calib:
            p.error("--calib is for --importance wanda or flap")
        if len(args.calib_tokens) != 2:
            p.error("--calib-tokens takes N,SEQ")
    if getattr(args, "onnx", None):
        if len(args.onnx) > len(args.model):
            p.error(f"--onnx: {len(args.onnx)} files for {len(args.model)} model(s)")
        for f in args.onnx:
            if f != "-" and not Path(f).is_file():
                p.error(f"--onnx: '{f}' is not a file")
        args.onnx = [None if f == "-" else f for f in args.onnx]


def main(argv: list[str] | None = None) -> int:
    from fxslim._commands import COMMANDS

    parser = _build()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        if args.threads is not None:
            _setup_threads(args.threads)
        with contextlib.redirect_stdout(sys.stderr):  # stdout holds the result only
            result, text = COMMANDS[args.cmd](args)
    except FxslimError as exc:
        print(f"fxslim {args.cmd}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, default=str) if args.json else text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
