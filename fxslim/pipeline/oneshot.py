"""One pipeline step on models named by specs: ``fxslim distill / export / bench / report``.

The step implementations are the pipeline's own (`fxslim.pipeline.steps`); only where the
models come from differs: `SpecContext` resolves the specs given on the command line
instead of reading a run directory. The output goes to a path the user names:

* a folder (distill: ``model/`` + ``step.json`` + ``log.txt``; report: ``report.md``,
  ``report.html``, the PNGs, ``step.json``), or
* a file (export: the ``.onnx`` file; bench: the step's JSON record).

It is checked before any work (an existing path is replaced only with ``force``, and a
folder only when it is empty or an earlier output of these commands: it holds a
``step.json``), and it appears only once the step finished: the step runs in a temporary
folder beside it, renamed into place at the end (`fxslim.pipeline.execute`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fxslim.errors import ArgumentError
from fxslim.pipeline.config import Pipeline
from fxslim.pipeline.execute import STEP_FILE, TMP, execute, replace_dir
from fxslim.pipeline.steps import STEPS, StepContext, groups_record, model_metrics, traced

__all__ = ["SpecContext", "check_output", "run_one"]


class SpecContext(StepContext):
    """A step on the models named by specs: `cfg.model` (and `models`, for bench and report),
    a saved fxslim directory resolved with `cfg.arch`; the teacher by its own spec."""

    def __init__(self, cfg: Pipeline, log: Callable[[str], None], progress: bool = False, *,
                 models: list[str] | None = None, teacher: str | None = None,
                 onnx: dict[str, Path] | None = None, bench: Any = None):
        super().__init__(cfg, log, progress)
        self.models = models or [cfg.model]
        self.teacher_spec, self.onnx, self.bench = teacher, onnx or {}, bench

    def preflight(self) -> None:
        """Resolve every model and run it once on the example inputs, before any work; the
        step then gets these very models (each once)."""
        self._loaded = {spec: self._resolve(spec) for spec in self.models}
        if self.teacher_spec is not None:
            self._teacher = self._resolve(self.teacher_spec, "the teacher ")

    def _resolve(self, spec: str, what: str = "") -> Any:
        from fxslim.pipeline.specs import resolve_model

        self.log(f"loading {what}{spec}")
        return checked(spec, resolve_model(spec, self.cfg.arch), self.inputs())

    def load(self, spec: str) -> Any:
        loaded = getattr(self, "_loaded", {})
        model = loaded.pop(spec) if spec in loaded else self._resolve(spec)
        return traced(model, self.inputs())

    def previous_model(self) -> Any:
        return self.load(self.cfg.model)

    def teacher(self) -> tuple[str, Any]:
        assert self.teacher_spec is not None, "distill needs a teacher spec"
        model = getattr(self, "_teacher", None) or self._resolve(self.teacher_spec, "the teacher ")
        return self.teacher_spec, model

    def export_targets(self, baseline: bool) -> list[tuple[str, str, Any]]:
        return [("model", self.cfg.model, self.previous_model)]

    def stages(self) -> list[tuple[str, Any]]:
        return [(spec, lambda spec=spec: self.load(spec)) for spec in self.models]

    def onnx_files(self) -> dict[str, Path]:
        return dict(self.onnx)

    def records(self) -> tuple[dict[str, dict], str, str]:
        """Each model's record as the pipeline's source step and model steps write it (the
        first with its channel groups), plus a benchmark record when asked for."""
        records: dict[str, dict] = {}
        for i, spec in enumerate(self.models):
            t0 = time.perf_counter()
            model = self.load(spec)
            self.log(f"measuring {spec}")
            metrics = model_metrics(self, model) | (groups_record(self, model) if i == 0 else {})
            records[spec] = {"kind": "source" if i == 0 else "model", "options": None,
                             "seconds": time.perf_counter() - t0, "metrics": metrics}
        if self.bench is not None:
            t0 = time.perf_counter()
            metrics = STEPS["benchmark"](self, self.bench, Path())
            records["benchmark"] = {"kind": "benchmark", "options": self.bench.model_dump(mode="json"),
                                    "seconds": time.perf_counter() - t0, "metrics": metrics}
        return records, self.models[0], self.models[-1]


def checked(spec: str, model: Any, inputs: tuple) -> Any:
    """`model` after one forward pass on the example inputs: a model that cannot take them
    fails here, before any work, with a SpecError saying so."""
    import torch

    from fxslim.errors import SpecError

    try:
        with torch.inference_mode():
            model(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"model '{spec}' does not run on example inputs of shape {shapes} ({first}); "
                        "give --shape") from None
    return model


def check_output(out: Path, force: bool, folder: bool) -> None:
    """Refuse, before any work, to write where something is and may not be replaced."""
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ArgumentError(f"'{out}': '{above}' is a file, not a folder (nothing was done)")
    if not out.exists():
        return
    if not force:
        raise ArgumentError(f"'{out}' already exists; pass --force to replace it (nothing was done)")
    if folder and not out.is_dir():
        raise ArgumentError(f"'{out}' is a file; this command writes a folder there (nothing was done)")
    if not folder and out.is_dir():
        raise ArgumentError(f"'{out}' is a folder; give a file path (nothing was done)")
    if folder and any(out.iterdir()) and not (out / STEP_FILE).is_file():
        raise ArgumentError(f"'{out}' holds files that no fxslim command wrote (no {STEP_FILE}); it is not "
                            "replaced, even with --force: choose another path (nothing was done)")


def run_one(kind: str, ctx: SpecContext, opts: Any, out: Path | None, force: bool = False,
            keep: str | None = None) -> dict:
    """Run step `kind` and place its output at `out`: the whole folder, or only the file
    `keep` of it (None: nothing is kept). Returns the step's record."""
    import tempfile

    from fxslim.utils import folders_made

    if out is not None:
        check_output(out, force, folder=keep is None)
    ctx.preflight()
    parent = out.parent if out is not None else Path(tempfile.gettempdir())
    tmp = parent / f"{TMP}{out.name if out else kind}-{os.getpid()}"
    with folders_made(parent):  # folders made for `out` go again if the step fails
        tmp.mkdir()
        try:
            record = execute(kind, ctx, opts, tmp, {"name": kind})
            if out is not None and keep is None:
                replace_dir(tmp, out)
            elif out is not None:
                os.replace(tmp / keep, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return record
