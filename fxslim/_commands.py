"""What each `fxslim` subcommand does, once `fxslim.cli` has parsed and checked its arguments.

Every command returns ``(result, text)``: `fxslim.cli.main` prints the text, or with
``--json`` the result as one JSON object; progress lines and bars go to stderr. Nothing
here imports torch at module import time (``fxslim --help`` stays instant).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fxslim.errors import ArgumentError

__all__ = ["COMMANDS"]

Result = tuple[dict, str]


class Progress:
    """One line per stage on stderr with its time, for commands that take a while."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            _line(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}")


def _line(text: str) -> None:
    """A line on stderr that does not break a progress bar being drawn there."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def _model(args: argparse.Namespace, say: Progress) -> Any:
    from fxslim.pipeline.specs import resolve_model

    say(f"loading {args.model}")
    return resolve_model(args.model, getattr(args, "arch", None))


def _inputs(args: argparse.Namespace) -> Any:
    from fxslim.pipeline.specs import example_inputs

    return example_inputs(_shape(args), getattr(args, "arch", None) or args.model)[0]


def _shape(args: argparse.Namespace, data: str | None = None) -> tuple[int, ...] | None:
    """--shape, else the built-in model's (or data's), else None with data (the shape of its
    first batch), else 1,3,224,224."""
    from fxslim.pipeline.specs import BUILTIN, default_shape

    model = args.model[0] if isinstance(args.model, list) else args.model
    for name in (model, getattr(args, "arch", None), data):
        if name in BUILTIN and not args.shape:
            return BUILTIN[name][2]
    hf = default_shape(getattr(args, "arch", None) or model)
    return args.shape or (None if data else hf or (1, 3, 224, 224))


def cmd_demo(args: argparse.Namespace) -> Result:
    import copy

    import torch

    import fxslim
    from fxslim.runtime.compare import compare
    from fxslim.runtime.examples import DigitsResNet, accuracy, digits_loaders, fit
    from fxslim.runtime.measure import count_macs, count_params, measure_latency

    say = Progress()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train, val = digits_loaders(seed=args.seed)
    say(f"training DigitsResNet for {args.epochs} epochs ({args.threads} thread(s))")
    model = fit(DigitsResNet(), train, epochs=args.epochs, lr=3e-3, seed=args.seed,  # lr given: a fast demo
                progress=not args.quiet)
    x = torch.randn(1, 1, 8, 8)
    say(f"pruning {args.ratio:.0%} of every channel group")
    small = fxslim.prune(model, x, args.ratio, ignore=["fc"])
    models = {"original": model, f"pruned {args.ratio:.0%}": small}
    if args.finetune:
        from fxslim.passes.distill import distill

        say(f"distilling the pruned model for {args.finetune} epochs")
        models[f"pruned + {args.finetune} ep distillation"] = distill(
            copy.deepcopy(small), model, train, val, epochs=args.finetune, lr=2e-3, seed=args.seed,
            progress=not args.quiet).student
    say("measuring latency")
    acc = {label: accuracy(m, val) for label, m in models.items()}
    result = {"command": "demo", "ratio": args.ratio, "latency": "batch 1, torch eager, 1 thread", "models": {}}
    if args.json:
        for label, m in models.items():
            lat = measure_latency(m, x, runs=200, threads=1)
            result["models"][label] = {"params": count_params(m), "macs": count_macs(m, x),
                                       "val_accuracy": acc[label], "torch_p50_ms": lat["median_ms"],
                                       "torch_p90_ms": lat["p90_ms"]}
        return result, ""
    table = compare(models, x, threads=1, runs=200, extra={k: {"val acc": f"{v:.3f}"} for k, v in acc.items()})
    return result, (f"fxslim demo: DigitsResNet on sklearn digits (1797 8x8 images), prune ratio {args.ratio}\n"
                    f"{table}\n({time.perf_counter() - t0:.1f} s; latency: batch 1, torch eager, 1 thread)")


def cmd_groups(args: argparse.Namespace) -> Result:
    import fxslim

    say = Progress(args.quiet)
    model = _model(args, say)
    say("tracing and analysing")
    groups = fxslim.channel_groups(model, _inputs(args))
    result = {"command": "groups", "model": args.model, "groups": [
        {"id": g.id, "size": g.size, "prunable": g.prunable, "pinned": g.reason, "text": str(g)} for g in groups]}
    return result, "\n".join(str(g) for g in groups)


def cmd_prune(args: argparse.Namespace) -> Result:
    import fxslim
    from fxslim.runtime.compare import compare
    from fxslim.runtime.measure import count_macs, count_params, measure_latency

    if args.save:
        from fxslim.pipeline.oneshot import check_output

        check_output(Path(args.save), args.force, folder=True)
    say = Progress(args.quiet)
    model = _model(args, say)
    x = _inputs(args)
    say(f"tracing and pruning {args.ratio:.0%} of every channel group")
    small = fxslim.prune(model, x, args.ratio, ignore=args.ignore)
    say(f"measuring ({args.runs} runs, {args.threads} thread(s))")
    result: dict[str, Any] = {"command": "prune", "model": args.model, "ratio": args.ratio, "models": {},
                              "saved": args.save}
    for name, m in (("original", model), ("pruned", small)):
        lat = measure_latency(m, x, runs=args.runs, threads=args.threads)
        result["models"][name] = {"params": count_params(m), "macs": count_macs(m, x),
                                  "torch_p50_ms": lat["median_ms"], "torch_p90_ms": lat["p90_ms"]}
    text = "" if args.json else compare({"original": model, "pruned": small}, x, threads=args.threads, runs=args.runs)
    if args.save:
        fxslim.save(small, args.save, overwrite=args.force)
        say(f"saved to {args.save} (load with fxslim.load, or as a model spec with --arch {args.model})")
    return result, text


def cmd_llm_prune(args: argparse.Namespace) -> Result:
    from tqdm import tqdm

    from fxslim.passes.llm_stream import calibration_ids, llm_prune

    importance = args.importance or ("wanda" if args.calib else "magnitude")
    calib = None
    if importance != "magnitude":
        n, seq = args.calib_tokens
        calib = calibration_ids(args.checkpoint, args.calib, n=n, seq_len=seq)
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet:
            return
        bar = bars.get(stage)
        if bar is None:
            unit = "shard" if stage == "write" else "layer"
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    Progress(args.quiet)(f"planning {args.checkpoint} on the meta device ({importance} importance)")
    report = llm_prune(args.checkpoint, args.out, args.heads, args.mlp, importance=importance, calib=calib,
                       overwrite=args.force, progress=progress)
    result = {"command": "llm-prune", "checkpoint": args.checkpoint, "heads": args.heads, "mlp": args.mlp,
              "importance": importance, **report.as_dict()}
    return result, str(report)


def cmd_run(args: argparse.Namespace) -> Result:
    from fxslim.pipeline.config import load_config

    config = load_config(args.config)  # every problem reported before anything runs
    if args.threads is not None:
        config = config.model_copy(update={"threads": args.threads})
    from fxslim.pipeline.runner import plan, run_pipeline, summary

    out = run_pipeline(config, args.out, dry_run=args.dry_run, force=args.force, progress=not args.quiet,
                       log=None if args.quiet else _line)
    if args.dry_run:
        run_dir = Path(args.out or config.out or Path("runs") / (config.name or "pipeline"))
        return {"command": "run", "dry_run": True, "out": str(run_dir), "steps": plan(config, run_dir)}, str(out)
    return summary(Path(out)), f"run directory: {out}"


# one step on model specs -----------------------------------------------------------------
def _options(kind: str, **given: Any) -> Any:
    """The step's options, validated by the same schema as a config's (one line per problem)."""
    from pydantic import ValidationError

    from fxslim.pipeline.config import STEP_KINDS

    try:
        return STEP_KINDS[kind].model_validate({k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        e = exc.errors()[0]
        flag = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else "options"
        raise ArgumentError(f"{flag}: {e['msg'].removeprefix('Value error, ')}") from None


def _context(args: argparse.Namespace, kind: str, opts: Any, **kw: Any) -> Any:
    from pydantic import ValidationError

    from fxslim.pipeline.config import Pipeline, Step
    from fxslim.pipeline.oneshot import SpecContext

    models = args.model if isinstance(args.model, list) else [args.model]
    shape = _shape(args, getattr(args, "data", None))
    try:
        cfg = Pipeline(name=Path(args.out).name if getattr(args, "out", None) else kind, model=models[0],
                       arch=args.arch, data=getattr(args, "data", None), inputs=shape and list(shape),
                       seed=args.seed,
                       threads=args.threads, steps=[Step(kind=kind, options=opts)])
    except ValidationError as exc:
        raise ArgumentError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return SpecContext(cfg, Progress(args.quiet), progress=not args.quiet, models=models, **kw)


def cmd_distill(args: argparse.Namespace) -> Result:
    from fxslim.pipeline.oneshot import run_one

    opts = _options("distill", epochs=args.epochs, lr=args.lr, alpha=args.alpha, temperature=args.temperature,
                    features=args.features)
    ctx = _context(args, "distill", opts, teacher=args.teacher)
    if ctx.cfg.data is None:
        raise ArgumentError("distill needs training data: give --data (digits, mnist1d or "
                            "package.module:function returning (train_loader, val_loader))")
    out = Path(args.out)
    ctx.log(f"distilling {args.model} from {args.teacher} for {opts.epochs} epoch(s) on {ctx.cfg.data}")
    record = run_one("distill", ctx, opts, out, args.force)
    m = record["metrics"]
    result = {"command": "distill", "out": str(out), "model": str(out / "model"), "seconds": record["seconds"],
              "metrics": m}
    acc = m.get("eval", {}).get("accuracy")
    text = (f"distilled model saved to {out / 'model'} (load it as a model spec with --arch); "
            f"params {m['params']}, MACs {m['macs']}" + (f", val accuracy {acc:.4f}" if acc is not None else ""))
    return result, text


def cmd_export(args: argparse.Namespace) -> Result:
    from fxslim.pipeline.oneshot import run_one

    opts = _options("export", opset=args.opset, simplify=not args.no_simplify, tol=args.tol, baseline=False)
    ctx = _context(args, "export", opts)
    out = Path(args.out)
    record = run_one("export", ctx, opts, out, args.force, keep="model.onnx")
    rep = record["metrics"]["onnx"]["model"] | {"path": str(out)}
    rep.pop("stage", None)
    result = {"command": "export", "out": str(out), "seconds": record["seconds"], "onnx": rep}
    text = (f"{out}: {rep['exporter']} exporter, opset {rep['opset']}, {rep['nodes_after']} nodes, "
            f"{rep['file_bytes']} bytes; onnxruntime matches torch to {rep['max_diff']:.2e} (scaled) on "
            f"batch sizes {', '.join(map(str, rep['batch_sizes']))}")
    return result, text


def cmd_bench(args: argparse.Namespace) -> Result:
    from fxslim.pipeline.oneshot import run_one

    onnx = {m: Path(f) for m, f in zip(args.model, args.onnx or []) if f}
    opts = _options("benchmark", batch_sizes=args.batch_sizes, threads=args.threads, runs=args.runs,
                    warmup=args.warmup, onnxruntime=bool(onnx))
    ctx = _context(args, "benchmark", opts, onnx=onnx)
    out = Path(args.out) if args.out else None
    record = run_one("benchmark", ctx, opts, out, args.force, keep="step.json")
    stages = record["metrics"]["stages"]
    result = {"command": "bench", "out": str(out) if out else None, "seconds": record["seconds"],
              "threads": opts.threads, "runs": opts.runs, "stages": stages}
    lines = [f"latency in ms ({opts.runs} runs, {opts.threads} thread(s)): p50 / p90"]
    for name, row in stages.items():
        lines.append(f"  {name}: " + "; ".join(f"{k} {v['p50_ms']:.3f} / {v['p90_ms']:.3f}" for k, v in row.items()))
    return result, "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> Result:
    from fxslim.pipeline.oneshot import run_one

    opts = _options("report", title=args.title)
    bench = _options("benchmark", runs=args.runs, threads=args.threads) if args.runs else None
    ctx = _context(args, "report", opts, bench=bench)
    out = Path(args.out)
    record = run_one("report", ctx, opts, out, args.force)
    files = [str(out / f) for f in record["metrics"]["files"]]
    result = {"command": "report", "out": str(out), "seconds": record["seconds"], "files": files}
    return result, f"report: {out / 'report.html'} (and {out / 'report.md'})"


def cmd_advise(args: argparse.Namespace) -> Result:
    from fxslim.advisor.store import Store
    from fxslim.pipeline.specs import BUILTIN, resolve_data

    out = Store.check(args.out)  # before any work
    data = args.data or next((n for n in (args.model, args.arch) if n in BUILTIN), None)
    if data is None:
        raise ArgumentError("advise needs labelled data: give --data (digits, mnist1d or "
                            "package.module:function returning (train_loader, val_loader))")
    say = Progress(args.quiet)
    model = _model(args, say)
    x = _inputs(args) if args.shape or data not in BUILTIN else _example(BUILTIN[data][2])
    train, val = resolve_data(data, seed=args.seed)
    epochs = args.train_epochs if args.train_epochs is not None else (4 if args.model in BUILTIN else 0)
    if epochs:
        from fxslim.runtime.examples import fit

        say(f"training the original for {epochs} epoch(s) on {data}")
        model = fit(model, train, epochs=epochs, lr=3e-3, seed=args.seed, progress=not args.quiet)
    import fxslim

    res = fxslim.advise(model, x, train, val, out_dir=out, targets=args.targets, target_kind=args.kind,
                        budget=args.epochs, seeds=args.seeds, lr=args.lr if args.lr is not None else "auto",
                        prune_options={"ignore": args.ignore} if args.ignore else None, threads=args.threads,
                        latency_runs=args.latency_runs, onnx=not args.no_onnx, progress=not args.quiet,
                        log=None if args.quiet else say)
    result = {"command": "advise", "out": str(out), "ran": res.ran, "resumed": res.skipped,
              "recommendations": res.recommendations, "front": res.front, "rows": res.rows,
              "files": [str(out / f) for f in ("results.json", "results.md", "accuracy_latency.png",
                                               "training.png")]}
    return result, f"{res.text}\n\nwritten to {out} (results.md, results.json, plots, models/)"


def _example(shape: tuple[int, ...]) -> Any:
    from fxslim.pipeline.specs import example_inputs

    return example_inputs(shape)[0]


COMMANDS = {"advise": cmd_advise, "demo": cmd_demo, "groups": cmd_groups, "prune": cmd_prune, "run": cmd_run,
            "distill": cmd_distill, "export": cmd_export, "bench": cmd_bench, "report": cmd_report,
            "llm-prune": cmd_llm_prune}
