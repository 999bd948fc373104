"""Running a pipeline into a run directory, like a build system.

    RUN_DIR/
      manifest.json             config, versions, machine, seeds, and per step: key, ran/skipped, seconds
      steps/00-source/          the model as given, traced (fxslim.save format) + step.json
      steps/01-finetune/model/  every model step: model/ (fxslim.save), step.json (metrics), log.txt
      steps/03-export/          model.onnx (and baseline.onnx), step.json
      steps/04-benchmark/       step.json (latency of every stage)
      steps/05-report/          report.md, report.html (self-contained), *.png

Each step has a *key*: the sha256 of the previous step's key, its kind and its options.
The source step's key covers the model, arch, data and inputs specs, the seed, the thread
count (results depend on it bit for bit), the fxslim version and the hash of fxslim's
source files, and the files of a saved model; not the code behind a
``package.module:function`` spec (use ``--force`` after changing that). A step whose
folder holds a ``step.json`` with its key is up to date and skipped; changing one option
changes the keys of that step and every step after it, so exactly those re-run. A step
writes into ``steps/.tmp-NN-kind-PID/`` and is renamed into place only when it finished,
with ``step.json`` written last; an interrupted run leaves only a temporary folder
(removed on the next run) and resumes from the first step that is not up to date. Every
model step reads its input model back from the previous step's save, so a resumed run
computes exactly what an uninterrupted one does (seeded, same thread count).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fxslim.pipeline.config import MODEL_STEPS, Pipeline

__all__ = ["STEPS", "plan_text", "run_pipeline", "step_keys"]

STEP_FILE = "step.json"
_TMP = ".tmp-"


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _files_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _code_sha() -> str:
    """fxslim's own source: a changed pass or step re-runs everything, like a changed compiler."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def step_keys(cfg: Pipeline) -> list[str]:
    """The chained key of the source step and of every configured step."""
    import fxslim
    from fxslim.pipeline.specs import check_model_spec

    saved = _files_sha(Path(cfg.model)) if check_model_spec(cfg.model) == "saved" else None
    keys = [_sha("source", cfg.model, cfg.arch, cfg.data, cfg.inputs, cfg.seed, cfg.threads, saved,
                 fxslim.__version__, _code_sha())]
    for st in cfg.steps:
        keys.append(_sha(keys[-1], st.kind, st.options.model_dump(mode="json")))
    return keys


def _names(cfg: Pipeline) -> list[str]:
    return ["00-source"] + [f"{i:02d}-{st.kind}" for i, st in enumerate(cfg.steps, 1)]


def _done(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / STEP_FILE).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


class _Ctx:
    """What a step sees: the config, the run directory, the finished steps' records."""

    def __init__(self, cfg: Pipeline, steps_dir: Path, names: list[str], index: int, log: Callable[[str], None]):
        self.cfg, self.steps_dir, self.names, self.index, self.log = cfg, steps_dir, names, index, log

    # models ---------------------------------------------------------------------------
    def fresh_arch(self) -> Any:
        from fxslim.pipeline.specs import check_model_spec, resolve_model

        spec = self.cfg.arch if check_model_spec(self.cfg.model) == "saved" else self.cfg.model
        return resolve_model(spec)

    def record(self, i: int) -> dict:
        return json.loads((self.steps_dir / self.names[i] / STEP_FILE).read_text())

    def model_steps(self, upto: int | None = None) -> list[int]:
        """Indices (0 = source) of the finished steps that produced a model, before `upto`."""
        upto = self.index if upto is None else upto
        return [i for i in range(upto) if i == 0 or self.cfg.steps[i - 1].kind in MODEL_STEPS]

    def load(self, i: int) -> Any:
        import fxslim

        return fxslim.load(self.steps_dir / self.names[i] / "model", self.fresh_arch())

    def previous_model(self) -> Any:
        return self.load(self.model_steps()[-1])

    def baseline_index(self) -> int:
        """The model before the first prune step (the teacher, the report's 'before')."""
        prunes = [i for i in range(1, len(self.names)) if self.cfg.steps[i - 1].kind == "prune"]
        first = prunes[0] if prunes else len(self.names)
        return self.model_steps(first)[-1]

    # data -----------------------------------------------------------------------------
    def data(self) -> tuple[Any, Any] | None:
        from fxslim.pipeline.specs import resolve_data

        return resolve_data(self.cfg.data, self.cfg.seed)  # fresh loaders: same shuffles on resume

    def inputs(self) -> tuple:
        from fxslim.pipeline.specs import resolve_inputs

        return resolve_inputs(self.cfg.inputs, self.cfg.data, self.cfg.arch or self.cfg.model)


def _model_metrics(ctx: _Ctx, model: Any) -> dict:
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


def _save(model: Any, tmp: Path) -> None:
    import fxslim

    fxslim.save(model, tmp / "model")


def _source(ctx: _Ctx, opts: Any, tmp: Path) -> dict:
    import fxslim
    from fxslim.pipeline.specs import resolve_model

    model = resolve_model(ctx.cfg.model, ctx.cfg.arch)
    from fxslim.passes.keep_classes import keep_classes
    from fxslim.utils import fxslim_meta

    if "fxslim_source" not in fxslim_meta(model):  # the model's own classes with fxslim's record
        model = keep_classes(model, fxslim.trace(model, ctx.inputs()), ctx.inputs())  # (else the graph)
    groups = fxslim.channel_groups(model, ctx.inputs())
    _save(model, tmp)
    pinned = [{"group": g.id, "size": g.size, "reason": g.reason} for g in groups if not g.prunable]
    return _model_metrics(ctx, model) | {"groups": len(groups), "pinned": pinned}


def _train_labels(model: Any, train: Any, val: Any, epochs: int, lr: float, seed: int) -> list[dict]:
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
        for x, y in train:
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


def _finetune(ctx: _Ctx, opts: Any, tmp: Path) -> dict:
    data = ctx.data()
    if data is None:
        raise _needs_data("finetune")
    model = ctx.previous_model()
    history = _train_labels(model, data[0], data[1], opts.epochs, opts.lr, ctx.cfg.seed)
    model.eval()
    _save(model, tmp)
    return _model_metrics(ctx, model) | {"history": history}


def _needs_data(kind: str) -> Exception:
    from fxslim.errors import ConfigError

    return ConfigError(f"step '{kind}' needs training data: set `data:` in the config")


def _prune(ctx: _Ctx, opts: Any, tmp: Path) -> dict:
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
    return _model_metrics(ctx, small)


def _distill(ctx: _Ctx, opts: Any, tmp: Path) -> dict:
    from fxslim.passes.distill import distill

    data = ctx.data()
    if data is None:
        raise _needs_data("distill")
    student, teacher = ctx.previous_model(), ctx.load(ctx.baseline_index())
    res = distill(student, teacher, data[0], data[1], epochs=opts.epochs, lr=opts.lr, alpha=opts.alpha,
                  temperature=opts.temperature, features=opts.features or None, seed=ctx.cfg.seed,
                  device="cpu", progress=False)
    _save(res.student, tmp)
    return _model_metrics(ctx, res.student) | {"history": res.history, "best_epoch": res.best_epoch,
                                               "teacher": ctx.names[ctx.baseline_index()]}


def _export(ctx: _Ctx, opts: Any, tmp: Path) -> dict:
    from dataclasses import asdict

    import fxslim

    out = {}
    which = [("model", ctx.model_steps()[-1])]
    if opts.baseline and ctx.baseline_index() != which[0][1]:
        which.append(("baseline", ctx.baseline_index()))
    for name, i in which:
        rep = fxslim.export_onnx(ctx.load(i), ctx.inputs(), tmp / f"{name}.onnx", simplify=opts.simplify,
                                 opset=opts.opset, tol=opts.tol)
        out[name] = asdict(rep) | {"path": f"{name}.onnx", "stage": ctx.names[i]}
    return {"onnx": out}


def _benchmark(ctx: _Ctx, opts: Any, tmp: Path) -> dict:
    import torch

    from fxslim.runtime.measure import measure_latency, onnx_latency

    x = ctx.inputs()
    onnx_files = {}  # stage name -> .onnx path (from the latest export step)
    for i in range(ctx.index - 1, 0, -1):
        if ctx.cfg.steps[i - 1].kind == "export":
            for rec in ctx.record(i)["metrics"]["onnx"].values():
                onnx_files[rec["stage"]] = ctx.steps_dir / ctx.names[i] / rec["path"]
            break
    stages = {}
    for i in ctx.model_steps():
        model = ctx.load(i)
        row: dict[str, Any] = {}
        for bs in opts.batch_sizes:
            xb = tuple(t.expand(bs, *t.shape[1:]).contiguous() if t.shape[0] == 1 else t for t in x)
            lat = measure_latency(model, xb, warmup=opts.warmup, runs=opts.runs, threads=opts.threads)
            row[f"torch_bs{bs}"] = {"p50_ms": lat["median_ms"], "p90_ms": lat["p90_ms"]}
            if opts.onnxruntime and ctx.names[i] in onnx_files:
                lat = onnx_latency(str(onnx_files[ctx.names[i]]), xb, threads=opts.threads, warmup=opts.warmup,
                                   runs=opts.runs)
                row[f"onnxruntime_bs{bs}"] = {"p50_ms": lat["median_ms"], "p90_ms": lat["p90_ms"]}
        stages[ctx.names[i]] = row
        ctx.log(f"    {ctx.names[i]}: " + ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in row.items()))
    return {"stages": stages, "threads": opts.threads, "torch_threads_default": torch.get_num_threads()}


def _report(ctx: _Ctx, opts: Any, tmp: Path) -> dict:
    from fxslim.pipeline.report import write_report

    records = {ctx.names[i]: ctx.record(i) for i in range(ctx.index)}
    files = write_report(ctx.cfg, records, ctx.names[ctx.baseline_index()], ctx.names[ctx.model_steps()[-1]],
                         tmp, opts.title)
    return {"files": files}


STEPS: dict[str, Callable[[_Ctx, Any, Path], dict]] = {
    "source": _source, "finetune": _finetune, "prune": _prune, "distill": _distill,
    "export": _export, "benchmark": _benchmark, "report": _report,
}


def _describe(kind: str, opts: Any) -> str:
    if opts is None:
        return "resolve, trace and save the model; count params and MACs; evaluate (with data)"
    set_opts = {k: v for k, v in opts.model_dump().items() if v not in (None, [], False)}
    what = {
        "finetune": "train with labels", "prune": "prune channel groups", "distill":
        "distil from the model before the first prune", "export": "export to ONNX and verify in onnxruntime",
        "benchmark": "measure every stage's latency", "report": "write report.md and report.html",
    }[kind]
    return f"{what} ({', '.join(f'{k}={v}' for k, v in set_opts.items())})"


def plan_text(cfg: Pipeline, run_dir: Path) -> str:
    """What `run` would do: one line per step, with whether it is up to date."""
    names, keys = _names(cfg), step_keys(cfg)
    kinds = [("source", None)] + [(s.kind, s.options) for s in cfg.steps]
    lines = [(f"pipeline '{cfg.name}' -> {run_dir} (model {cfg.model}, data {cfg.data}, seed {cfg.seed}, "
             f"{cfg.threads} thread(s))")]
    stale = False
    for name, key, (kind, opts) in zip(names, keys, kinds):
        stale = stale or not _done(run_dir / "steps" / name, key)
        lines.append(f"  {name:<14} {'will run ' if stale else 'up to date'}  {_describe(kind, opts)}")
    return "\n".join(lines)


def _machine() -> dict:
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for mod in ("torchvision", "timm", "onnx", "onnxruntime", "pydantic"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    import fxslim

    versions["fxslim"] = fxslim.__version__
    return {"versions": versions, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{_TMP}{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def run_pipeline(cfg: Pipeline, out: str | os.PathLike | None = None, *, dry_run: bool = False,
                 force: bool = False, log: Callable[[str], None] | None = None) -> Path | str:
    """Run `cfg` into a run directory (see the module doc); returns its path, or the plan
    text with `dry_run`. ``manifest.json`` lists which steps ran and which were skipped."""
    import torch

    say = log or (lambda m: None)
    run_dir = Path(out or cfg.out or Path("runs") / (cfg.name or "pipeline"))
    if dry_run:
        return plan_text(cfg, run_dir)
    steps_dir = run_dir / "steps"
    steps_dir.mkdir(parents=True, exist_ok=True)
    for leftover in steps_dir.glob(f"{_TMP}*"):  # an interrupted step's partial output
        shutil.rmtree(leftover, ignore_errors=True)
    torch.set_num_threads(cfg.threads)
    names, keys = _names(cfg), step_keys(cfg)
    kinds = [("source", None)] + [(s.kind, s.options) for s in cfg.steps]
    manifest = {"config": cfg.model_dump(mode="json", exclude={"steps"})
                | {"steps": [{s.kind: s.options.model_dump(mode="json")} for s in cfg.steps]},
                "seeds": {"seed": cfg.seed}, **_machine(), "steps": []}
    # steps of an earlier run at positions this config no longer has are left alone
    for i, (name, key, (kind, opts)) in enumerate(zip(names, keys, kinds)):
        final = steps_dir / name
        if not force and _done(final, key):
            say(f"{name}: up to date, skipped")
            manifest["steps"].append({"name": name, "key": key, "status": "skipped"})
            continue
        if final.exists() and not (final / STEP_FILE).is_file():
            from fxslim.errors import FxslimError

            raise FxslimError(f"'{final}' exists but is no step of an fxslim run (no {STEP_FILE}); nothing "
                              "there is replaced: choose another run directory (--out)")
        say(f"{name}: {_describe(kind, opts)}")
        tmp = steps_dir / f"{_TMP}{name}-{os.getpid()}"
        tmp.mkdir()
        handler = logging.FileHandler(tmp / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        lib = logging.getLogger("fxslim")
        lib.addHandler(handler)
        old_level = lib.level
        lib.setLevel(logging.INFO)
        t0 = time.perf_counter()
        try:
            torch.manual_seed(cfg.seed)
            metrics = STEPS[kind](_Ctx(cfg, steps_dir, names, i, say), opts, tmp)
            seconds = time.perf_counter() - t0
            handler.close()
            _write_json(tmp / STEP_FILE, {"key": key, "kind": kind, "name": name, "seconds": seconds,
                                          "options": opts.model_dump(mode="json") if opts else None,
                                          "metrics": metrics})
            if final.exists():  # an out-of-date result of this run directory's own step
                old = steps_dir / f"{_TMP}old-{name}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            with contextlib.suppress(OSError):
                (steps_dir / f"{name}.failed.log").unlink(missing_ok=True)
        except BaseException:
            handler.close()
            with contextlib.suppress(OSError):  # keep the failed step's log where a person looks
                shutil.copyfile(tmp / "log.txt", steps_dir / f"{name}.failed.log")
            say(f"{name}: failed; its log: {steps_dir / f'{name}.failed.log'}")
            raise
        finally:
            lib.removeHandler(handler)
            lib.setLevel(old_level)
            handler.close()
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"{name}: done in {seconds:.1f} s")
        manifest["steps"].append({"name": name, "key": key, "status": "ran", "seconds": round(seconds, 3)})
        _write_json(run_dir / "manifest.json", manifest)
    _write_json(run_dir / "manifest.json", manifest)
    return run_dir
