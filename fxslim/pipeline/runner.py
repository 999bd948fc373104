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
import functools
import hashlib
import json
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fxslim.pipeline.config import MODEL_STEPS, Pipeline
from fxslim.pipeline.execute import STEP_FILE, TMP, execute, replace_dir, write_json
from fxslim.pipeline.steps import STEPS, StepContext, describe

__all__ = ["STEPS", "RunContext", "plan", "plan_text", "run_pipeline", "step_keys", "summary"]

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


class RunContext(StepContext):
    """A step inside a run directory: its input models are the finished steps' saves."""

    def __init__(self, cfg: Pipeline, steps_dir: Path, names: list[str], index: int,
                 log: Callable[[str], None], progress: bool = False):
        super().__init__(cfg, log, progress)
        self.steps_dir, self.names, self.index = steps_dir, names, index

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

    def baseline_index(self) -> int:
        """The model before the first prune step (the teacher, the report's 'before')."""
        prunes = [i for i in range(1, len(self.names)) if self.cfg.steps[i - 1].kind == "prune"]
        first = prunes[0] if prunes else len(self.names)
        return self.model_steps(first)[-1]

    # StepContext ----------------------------------------------------------------------
    def previous_model(self) -> Any:
        return self.load(self.model_steps()[-1])

    def teacher(self) -> tuple[str, Any]:
        return self.names[self.baseline_index()], self.load(self.baseline_index())

    def export_targets(self, baseline: bool) -> list[tuple[str, str, Any]]:
        which = [("model", self.model_steps()[-1])]
        if baseline and self.baseline_index() != which[0][1]:
            which.append(("baseline", self.baseline_index()))
        return [(stem, self.names[i], functools.partial(self.load, i)) for stem, i in which]

    def stages(self) -> list[tuple[str, Any]]:
        return [(self.names[i], functools.partial(self.load, i)) for i in self.model_steps()]

    def onnx_files(self) -> dict[str, Path]:
        for i in range(self.index - 1, 0, -1):  # the latest export step's files
            if self.cfg.steps[i - 1].kind == "export":
                return {rec["stage"]: self.steps_dir / self.names[i] / rec["path"]
                        for rec in self.record(i)["metrics"]["onnx"].values()}
        return {}

    def records(self) -> tuple[dict[str, dict], str, str]:
        records = {self.names[i]: self.record(i) for i in range(self.index)}
        return records, self.names[self.baseline_index()], self.names[self.model_steps()[-1]]


def plan(cfg: Pipeline, run_dir: Path) -> list[dict]:
    """What `run` would do: per step its name, kind, whether it will run, and what it does."""
    names, keys = _names(cfg), step_keys(cfg)
    kinds = [("source", None)] + [(s.kind, s.options) for s in cfg.steps]
    rows, stale = [], False
    for name, key, (kind, opts) in zip(names, keys, kinds):
        stale = stale or not _done(run_dir / "steps" / name, key)
        rows.append({"name": name, "kind": kind, "status": "will run" if stale else "up to date",
                     "plan": describe(kind, opts)})
    return rows


def plan_text(cfg: Pipeline, run_dir: Path) -> str:
    """`plan` as text: one line per step, with whether it is up to date."""
    lines = [(f"pipeline '{cfg.name}' -> {run_dir} (model {cfg.model}, data {cfg.data}, seed {cfg.seed}, "
             f"{cfg.threads} thread(s))")]
    lines += [f"  {r['name']:<14} {r['status']:<10}  {r['plan']}"
              for r in plan(cfg, run_dir)]
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


def run_pipeline(cfg: Pipeline, out: str | os.PathLike | None = None, *, dry_run: bool = False,
                 force: bool = False, log: Callable[[str], None] | None = None,
                 progress: bool = False) -> Path | str:
    """Run `cfg` into a run directory (see the module doc); returns its path, or the plan
    text with `dry_run`. ``manifest.json`` lists which steps ran and which were skipped.
    `log` gets one line per step; `progress` shows tqdm bars (stderr) in long steps."""
    import torch

    say = log or (lambda m: None)
    run_dir = Path(out or cfg.out or Path("runs") / (cfg.name or "pipeline"))
    if dry_run:
        return plan_text(cfg, run_dir)
    steps_dir = run_dir / "steps"
    steps_dir.mkdir(parents=True, exist_ok=True)
    for leftover in steps_dir.glob(f"{TMP}*"):  # an interrupted step's partial output
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
        say(f"{name}: {describe(kind, opts)}")
        tmp = steps_dir / f"{TMP}{name}-{os.getpid()}"
        tmp.mkdir()
        try:
            ctx = RunContext(cfg, steps_dir, names, i, say, progress)
            seconds = execute(kind, ctx, opts, tmp, {"key": key, "name": name})["seconds"]
            replace_dir(tmp, final)
            with contextlib.suppress(OSError):
                (steps_dir / f"{name}.failed.log").unlink(missing_ok=True)
        except BaseException:
            with contextlib.suppress(OSError):  # keep the failed step's log where a person looks
                shutil.copyfile(tmp / "log.txt", steps_dir / f"{name}.failed.log")
            say(f"{name}: failed; its log: {steps_dir / f'{name}.failed.log'}")
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"{name}: done in {seconds:.1f} s")
        manifest["steps"].append({"name": name, "key": key, "status": "ran", "seconds": round(seconds, 3)})
        write_json(run_dir / "manifest.json", manifest)
    write_json(run_dir / "manifest.json", manifest)
    return run_dir


_KEY_METRICS = ("params", "macs", "eval", "best_epoch", "teacher", "groups", "stages", "files")


def summary(run_dir: Path) -> dict:
    """For scripts (``fxslim run --json``): per step of the last run its status, seconds,
    folder, artefact files and key metrics (each step's ``step.json`` has them all)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    steps = []
    for entry in manifest["steps"]:
        folder = run_dir / "steps" / entry["name"]
        record = json.loads((folder / STEP_FILE).read_text())
        metrics = {k: v for k, v in record["metrics"].items() if k in _KEY_METRICS}
        if "onnx" in record["metrics"]:
            metrics["onnx"] = {stem: {k: rep[k] for k in ("stage", "exporter", "opset", "max_diff", "file_bytes")}
                               for stem, rep in record["metrics"]["onnx"].items()}
        files = sorted(str(p.relative_to(run_dir)) for p in folder.rglob("*") if p.is_file())
        steps.append({"name": entry["name"], "kind": record["kind"], "status": entry["status"],
                      "seconds": round(record["seconds"], 3), "folder": str(folder), "artefacts": files,
                      "metrics": metrics})
    return {"command": "run", "out": str(run_dir), "manifest": str(run_dir / "manifest.json"), "steps": steps}
