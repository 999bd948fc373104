"""The step implementations, shared by `fxslim run` and the one-step subcommands.

A step is a function ``step(ctx, options, folder) -> metrics``: it reads its input models
through `StepContext`, writes its artefacts into `folder` (a temporary folder that the
caller renames into place once the step finished) and returns its metrics as a
JSON-ready dict. The context says where models come from: a run directory
(`fxslim.pipeline.runner.RunContext`: the previous step's save) or the model specs given on
the command line (`fxslim.pipeline.oneshot.SpecContext`); the steps do not know which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fxslim.pipeline.config import Pipeline

__all__ = ["STEPS", "StepContext", "describe", "groups_record", "model_metrics", "traced"]

Loader = Callable[[], Any]


class StepContext:
    """What a step sees: the config (model, data, inputs, seed, threads), a log for progress
    lines, and where its input models come from (subclasses)."""

    def __init__(self, cfg: Pipeline, log: Callable[[str], None], progress: bool = False):
        self.cfg, self.log, self.progress = cfg, log, progress

    def data(self) -> tuple[Any, Any] | None:
        from fxslim.pipeline.specs import resolve_data

        return resolve_data(self.cfg.data, self.cfg.seed)  # fresh loaders: same shuffles on resume

    def inputs(self) -> tuple:
        from fxslim.pipeline.specs import resolve_inputs

        if not hasattr(self, "_inputs"):  # seeded, so the same on every call; made once per step
            self._inputs = resolve_inputs(self.cfg.inputs, self.cfg.data, self.cfg.arch or self.cfg.model)
        return self._inputs

    # where models come from ------------------------------------------------------------
    def previous_model(self) -> Any:
        """The model this step works on (a traced GraphModule)."""
        raise NotImplementedError

    def teacher(self) -> tuple[str, Any]:
        """(stage name, model) of the distillation teacher."""
        raise NotImplementedError

    def export_targets(self, baseline: bool) -> list[tuple[str, str, Loader]]:
        """(file stem, stage name, model loader) of each model to export."""
        raise NotImplementedError

    def stages(self) -> list[tuple[str, Loader]]:
        """(stage name, model loader) of each model to measure."""
        raise NotImplementedError

    def onnx_files(self) -> dict[str, Path]:
        """Stage name -> its exported .onnx file, where there is one."""
        raise NotImplementedError

    def records(self) -> tuple[dict[str, dict], str, str]:
        """The finished steps' records for the report, and the 'before' and 'after' stages."""
        raise NotImplementedError


def model_metrics(ctx: StepContext, model: Any) -> dict:
    """Params, MACs, per-layer widths and, with labelled validation data, accuracy,
    precision, recall, F1 and the confusion matrix."""
    from fxslim.runtime.measure import count_macs, count_params

    x = ctx.inputs()
    out: dict[str, Any] = {"params": count_params(model), "macs": count_macs(model, x)}
    out["widths"] = {name: int(m.weight.shape[0]) for name, m in model.named_modules()
                     if getattr(m, "weight", None) is not None and m.weight.dim() >= 2}
    data = ctx.data()
    if data is not None and data[1] is not None:
        from fxslim.passes.distill import evaluate

        try:
            out["eval"] = evaluate(model, data[1])
            out["confusion"] = _confusion(model, data[1])
        except (TypeError, ValueError, AttributeError):  # unlabelled validation data
            pass
    return out


def _confusion(model: Any, val: Any) -> list[list[int]]:
    """Confusion matrix [true class][predicted class] on the validation data."""
    import torch

    preds, labels = [], []
    with torch.inference_mode():
        for x, y in val:
            preds.append(model(x).argmax(1))
            labels.append(y)
    p, y = torch.cat(preds), torch.cat(labels)
    n = int(max(p.max(), y.max())) + 1
    return torch.bincount(y * n + p, minlength=n * n).reshape(n, n).tolist()


def _save(model: Any, folder: Path) -> None:
    import fxslim

    fxslim.save(model, folder / "model")


def traced(model: Any, inputs: tuple) -> Any:
    """`model` with fxslim's record (as a save needs it), unless it already has one: the
    user's own classes where `keep_classes` proves them, else the traced graph."""
    import fxslim
    from fxslim.passes.keep_classes import keep_classes
    from fxslim.utils import fxslim_meta

    if "fxslim_source" in fxslim_meta(model):
        return model
    return keep_classes(model, fxslim.trace(model, inputs), inputs)


def groups_record(ctx: StepContext, model: Any) -> dict:
    """How many channel groups the model has, and the pinned ones with their reasons."""
    import fxslim

    groups = fxslim.channel_groups(model, ctx.inputs())
    pinned = [{"group": g.id, "size": g.size, "reason": g.reason} for g in groups if not g.prunable]
    return {"groups": len(groups), "pinned": pinned}


def _source(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    from fxslim.pipeline.specs import resolve_model

    model = traced(resolve_model(ctx.cfg.model, ctx.cfg.arch), ctx.inputs())
    groups = groups_record(ctx, model)
    _save(model, tmp)
    return model_metrics(ctx, model) | groups


def _train_labels(model: Any, train: Any, val: Any, epochs: int, lr: float, seed: int,
                  progress: bool = False) -> list[dict]:
    import torch
    from torch import nn

    from fxslim.passes.distill import evaluate

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(train)))
    history = []
    for epoch in range(epochs):
        model.train()
        total = seen = 0
        batches = train
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(train, desc=f"finetune epoch {epoch + 1}/{epochs}", leave=False)
        for x, y in batches:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + float(loss.detach()) * len(x), seen + len(x)
        row = {"epoch": epoch, "train_loss": total / max(seen, 1)}
        if val is not None:
            row |= {f"val_{k}": v for k, v in evaluate(model, val).items()}
        history.append(row)
        logging.getLogger("fxslim").info("epoch %d: %s", epoch, row)
    return history


def _needs_data(kind: str) -> Exception:
    from fxslim.errors import ConfigError

    return ConfigError(f"step '{kind}' needs training data: set `data:` in the config (--data on the "
                       "command line)")


def _finetune(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    data = ctx.data()
    if data is None:
        raise _needs_data("finetune")
    model = ctx.previous_model()
    history = _train_labels(model, data[0], data[1], opts.epochs, opts.lr, ctx.cfg.seed, ctx.progress)
    model.eval()
    _save(model, tmp)
    return model_metrics(ctx, model) | {"history": history}


def _prune(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    import fxslim

    model = ctx.previous_model()
    kw = opts.model_dump()
    backend = kw.pop("latency_backend")
    if kw["target_latency"] is not None:
        kw["latency_options"] = {"backend": backend, "threads": ctx.cfg.threads}
    if all(kw[k] is None for k in ("ratio", "target_macs", "target_latency")):
        kw["ratio"] = 0.5
    small = fxslim.prune(model, ctx.inputs(), **kw)
    _save(small, tmp)
    return model_metrics(ctx, small)


def _distill(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    from fxslim.passes.distill import distill

    data = ctx.data()
    if data is None:
        raise _needs_data("distill")
    student = ctx.previous_model()
    teacher_name, teacher = ctx.teacher()
    res = distill(student, teacher, data[0], data[1], epochs=opts.epochs, lr=opts.lr, alpha=opts.alpha,
                  temperature=opts.temperature, features=opts.features or None, seed=ctx.cfg.seed,
                  device="cpu", progress=ctx.progress)
    _save(res.student, tmp)
    return model_metrics(ctx, res.student) | {"history": res.history, "best_epoch": res.best_epoch,
                                              "teacher": teacher_name}


def _fold(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    from fxslim.passes._rewrite import as_graph
    from fxslim.passes.base import PassManager
    from fxslim.passes.drop_identity import DropIdentitiesPass
    from fxslim.passes.fold_bn import FoldBatchNormPass
    from fxslim.passes.fold_constants import FoldConstantsPass
    from fxslim.passes.fuse_linear import FuseLinearPass

    passes = [DropIdentitiesPass(), FoldBatchNormPass()]
    passes += [FoldConstantsPass()] if opts.fold_constants else []
    passes += [FuseLinearPass()] if opts.fuse_linear else []
    res = PassManager(passes)(as_graph(ctx.previous_model(), ctx.inputs()))
    _save(res.module, tmp)
    return model_metrics(ctx, res.module) | {"rewrites": res.info}


def _lowrank(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    from fxslim.passes._rewrite import as_graph
    from fxslim.passes.lowrank import LowRankPass

    kw = opts.model_dump()
    if all(kw[k] is None for k in ("energy", "rank_ratio", "target_params")):
        kw["rank_ratio"] = 0.5
    res = LowRankPass(**kw)(as_graph(ctx.previous_model(), ctx.inputs()))
    _save(res.module, tmp)
    return model_metrics(ctx, res.module) | {"ranks": res.info["ranks"], "full_ranks": res.info["full_ranks"]}


def _export(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    from dataclasses import asdict

    import fxslim

    out = {}
    targets = ctx.export_targets(opts.baseline)
    if ctx.progress:  # tens of seconds per model for large ones (torch.export + onnxruntime check)
        from tqdm.auto import tqdm

        targets = tqdm(targets, desc="export", unit="model", leave=False)
    for stem, stage, load in targets:
        ctx.log(f"    exporting {stage} to {stem}.onnx and checking it in onnxruntime")
        rep = fxslim.export_onnx(load(), ctx.inputs(), tmp / f"{stem}.onnx", simplify=opts.simplify,
                                 opset=opts.opset, tol=opts.tol)
        out[stem] = asdict(rep) | {"path": f"{stem}.onnx", "stage": stage}
    return {"onnx": out}


def _benchmark(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    import torch

    from fxslim.runtime.measure import measure_latency, onnx_latency

    x = ctx.inputs()
    onnx_files, stages = ctx.onnx_files(), ctx.stages()
    todo = sum(len(opts.batch_sizes) * (1 + bool(opts.onnxruntime and name in onnx_files)) for name, _ in stages)
    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo, desc="benchmark", unit="measurement", leave=False)
    results = {}
    for name, load in stages:
        model = load()
        row: dict[str, Any] = {}
        for bs in opts.batch_sizes:
            xb = tuple(t.expand(bs, *t.shape[1:]).contiguous() if t.shape[0] == 1 else t for t in x)
            lat = measure_latency(model, xb, warmup=opts.warmup, runs=opts.runs, threads=opts.threads)
            row[f"torch_bs{bs}"] = {"p50_ms": lat["median_ms"], "p90_ms": lat["p90_ms"]}
            if bar is not None:
                bar.update()
            if opts.onnxruntime and name in onnx_files:
                lat = onnx_latency(str(onnx_files[name]), xb, threads=opts.threads, warmup=opts.warmup,
                                   runs=opts.runs)
                row[f"onnxruntime_bs{bs}"] = {"p50_ms": lat["median_ms"], "p90_ms": lat["p90_ms"]}
                if bar is not None:
                    bar.update()
        results[name] = row
        ctx.log(f"    {name}: " + ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in row.items()))
    if bar is not None:
        bar.close()
    return {"stages": results, "threads": opts.threads, "torch_threads_default": torch.get_num_threads()}


def _report(ctx: StepContext, opts: Any, tmp: Path) -> dict:
    from fxslim.pipeline.report import write_report

    records, before, after = ctx.records()
    return {"files": write_report(ctx.cfg, records, before, after, tmp, opts.title)}


STEPS: dict[str, Callable[[StepContext, Any, Path], dict]] = {
    "source": _source, "finetune": _finetune, "prune": _prune, "distill": _distill,
    "export": _export, "benchmark": _benchmark, "report": _report, "fold": _fold, "lowrank": _lowrank,
}


def describe(kind: str, opts: Any) -> str:
    """One line saying what a step will do, with the options that are set."""
    if opts is None:
        return "resolve, trace and save the model; count params and MACs; evaluate (with data)"
    set_opts = {k: v for k, v in opts.model_dump().items() if v not in (None, [], False)}
    what = {
        "finetune": "train with labels", "prune": "prune channel groups", "distill":
        "distil from the model before the first prune", "export": "export to ONNX and verify in onnxruntime",
        "benchmark": "measure every stage's latency", "report": "write report.md and report.html",
        "fold": "drop identities, fold BatchNorm and constants, fuse Linear pairs (exact)",
        "lowrank": "factorise Linear/conv layers by truncated SVD",
    }[kind]
    return f"{what} ({', '.join(f'{k}={v}' for k, v in set_opts.items())})"
