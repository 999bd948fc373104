"""A digits pipeline end to end: every artefact; a changed option re-runs exactly the
steps downstream of it; a run killed inside a step resumes and ends bit-for-bit equal to
an uninterrupted run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fxslim import cli
from fxslim.pipeline import runner
from fxslim.pipeline.config import load_config
from tests.pipeline.runs import NAMES
from tests.pipeline.runs import config as _config
from tests.pipeline.runs import run as _run

torch.set_num_threads(1)


def _same_files(a: Path, b: Path) -> None:
    assert (a / "model" / "weights.safetensors").read_bytes() == (b / "model" / "weights.safetensors").read_bytes()
    ma, mb = (json.loads((d / "step.json").read_text())["metrics"] for d in (a, b))
    assert ma == mb


def test_every_artefact(first_run):
    _, run = first_run
    steps = run / "steps"
    assert sorted(p.name for p in steps.iterdir()) == NAMES  # no temporary folder left
    for name in NAMES[:4]:
        assert (steps / name / "model" / "plan.json").is_file() and (steps / name / "log.txt").is_file()
        plan = json.loads((steps / name / "model" / "plan.json").read_text())
        assert plan["form"] == "module"  # every step's model is the user's own classes
    finetune = json.loads((steps / "01-finetune" / "step.json").read_text())["metrics"]
    distill = json.loads((steps / "03-distill" / "step.json").read_text())["metrics"]
    assert finetune["eval"]["accuracy"] > 0.6 and len(finetune["history"]) == 3
    assert distill["params"] < finetune["params"] and distill["teacher"] == "01-finetune"
    assert distill["widths"]["fc"] == 10 and distill["widths"]["stem.0"] == 4
    onnx = json.loads((steps / "04-export" / "step.json").read_text())["metrics"]["onnx"]
    assert (steps / "04-export" / "model.onnx").is_file() and (steps / "04-export" / "baseline.onnx").is_file()
    assert onnx["model"]["max_diff"] < 1e-4 and onnx["baseline"]["stage"] == "01-finetune"
    bench = json.loads((steps / "05-benchmark" / "step.json").read_text())["metrics"]["stages"]
    assert set(bench) == {"00-source", "01-finetune", "02-prune", "03-distill"}
    assert {"torch_bs1", "torch_bs4", "onnxruntime_bs1", "onnxruntime_bs4"} <= set(bench["03-distill"])
    report = steps / "06-report"
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    for png in ("widths.png", "tradeoff.png", "confusion.png", "training.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in md
    assert page.count('src="data:image/png;base64,') == 4
    assert not re.search(r'(src|href)="(?!data:)', page), "the HTML page must be self-contained"
    assert "| 01-finetune |" in md and "| 03-distill |" in md and "Pinned channel groups" in md
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["model"] == "tests.pipeline.models:tiny_digits"
    assert manifest["seeds"] == {"seed": 3} and "torch" in manifest["versions"] and manifest["machine"]["cpus"]


def test_unchanged_run_skips_everything_and_a_changed_option_reruns_downstream(first_run, tmp_path):
    tmp, run = first_run
    out = tmp_path / "run"
    import shutil

    shutil.copytree(run, out)
    assert set(_run(_config(tmp), out).values()) == {"skipped"}
    # the benchmark's batch sizes change: it and the report after it re-run, nothing before
    status = _run(_config(tmp, batch_sizes="[2]"), out)
    assert [n for n in NAMES if status[n] == "ran"] == NAMES[5:]
    assert [n for n in NAMES if status[n] == "skipped"] == NAMES[:5]
    bench = json.loads((out / "steps" / "05-benchmark" / "step.json").read_text())["metrics"]["stages"]
    assert set(bench["03-distill"]) == {"torch_bs2", "onnxruntime_bs2"}
    md = (out / "steps" / "06-report" / "report.md").read_text()
    assert "| 03-distill | " in md and f" {bench['03-distill']['torch_bs2']['p50_ms']:.3f} |" in md


def test_dry_run_prints_the_plan_and_trains_nothing(first_run, tmp_path, capsys):
    tmp, run = first_run
    assert cli.main(["run", str(_config(tmp, epochs=5)), "--out", str(run), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert re.search(r"02-prune\s+up to date", plan) and re.search(r"03-distill\s+will run .*epochs=5", plan)
    assert re.search(r"06-report\s+will run", plan)
    assert cli.main(["run", str(_config(tmp)), "--out", str(tmp_path / "new"), "--dry-run"]) == 0
    assert not (tmp_path / "new").exists()


def test_killed_run_resumes_to_the_same_artefacts(first_run, tmp_path, monkeypatch):
    tmp, run = first_run
    out = tmp_path / "run"
    # the same pipeline but for the export of the baseline (one export less: the test's
    # slowest part); steps 00-03 and model.onnx are the same as the uninterrupted run's
    cfg = _config(tmp, baseline=False)
    real = runner.STEPS["distill"]

    def killed(ctx, opts, folder):
        real(ctx, opts, folder)  # the step's files are written, but it never finishes
        raise KeyboardInterrupt

    monkeypatch.setitem(runner.STEPS, "distill", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run_pipeline(load_config(cfg), out)
    assert sorted(p.name for p in (out / "steps").iterdir() if not p.name.endswith(".log")) == NAMES[:3]
    monkeypatch.setitem(runner.STEPS, "distill", real)
    status = _run(cfg, out)
    assert [n for n in NAMES if status[n] == "skipped"] == NAMES[:3]
    assert sorted(p.name for p in (out / "steps").iterdir()) == NAMES
    for name in NAMES[:4]:
        _same_files(out / "steps" / name, run / "steps" / name)
    a, b = ((d / "steps" / "04-export" / "model.onnx").read_bytes() for d in (out, run))
    assert a == b and not (out / "steps" / "04-export" / "baseline.onnx").exists()


def test_a_folder_the_run_did_not_write_is_never_replaced(tmp_path, capsys):
    mine = tmp_path / "out" / "steps" / "00-source"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    assert cli.main(["run", str(_config(tmp_path)), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "is no step of an fxslim run" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
