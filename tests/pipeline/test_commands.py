"""The one-step subcommands (distill, export, bench, report) and `--json` of `run`, on the
models of the shared digits run. Each subcommand runs the pipeline's own step, so given the
run's options and seed it reproduces the run's artefacts byte for byte; its `--json` is one
object on stdout that matches the files it wrote. Bad specs, options and output paths are
one-line errors (exit 2) before any work, and a failed step leaves nothing behind."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from fxslim import cli
from fxslim.errors import ExportError
from fxslim.pipeline import steps
from fxslim.pipeline.specs import resolve_model
from tests.pipeline.runs import ARCH, DATA, NAMES, config, record

torch.set_num_threads(1)


def _json(argv: list[str]) -> dict:
    """Run the command; its stdout must be exactly one JSON object."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main([*argv, "--json", "--quiet"]) == 0
    result = json.loads(buf.getvalue())
    assert isinstance(result, dict) and result["command"] == argv[0]
    return result


@pytest.fixture(scope="module")
def distilled(first_run, tmp_path_factory):
    """`fxslim distill` with the run's distill options, student and teacher."""
    _, run = first_run
    out = tmp_path_factory.mktemp("commands") / "distilled"
    result = _json(["distill", str(run / "steps/02-prune/model"), "--arch", ARCH, "--teacher",
                    str(run / "steps/01-finetune/model"), "--data", DATA, "--shape", "1,1,8,8", "--epochs", "1",
                    "--seed", "3", "-o", str(out)])
    return out, result


@pytest.fixture(scope="module")
def exported(distilled):
    out, _ = distilled
    path = out.parent / "digits.onnx"
    return path, _json(["export", str(out / "model"), "--arch", ARCH, "--shape", "1,1,8,8", "--no-simplify",
                        "-o", str(path)])


def test_distill_is_the_pipelines_step(first_run, distilled):
    _, run = first_run
    out, result = distilled
    weights = "model/weights.safetensors"
    assert (out / weights).read_bytes() == (run / "steps/03-distill" / weights).read_bytes()
    mine, theirs = record(out)["metrics"], record(run / "steps/03-distill")["metrics"]
    assert mine.pop("teacher").endswith("01-finetune/model") and theirs.pop("teacher") == "01-finetune"
    assert mine == theirs and result["metrics"] == record(out)["metrics"]
    assert result["out"] == str(out) and result["model"] == str(out / "model")
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "model", "step.json"]
    from fxslim.passes.distill import evaluate
    from tests.pipeline.models import digits_data

    model = resolve_model(result["model"], ARCH)
    assert evaluate(model, digits_data(seed=3)[1])["accuracy"] == result["metrics"]["eval"]["accuracy"]


def test_export_writes_the_runs_onnx_file_and_onnxruntime_matches_torch(first_run, distilled, exported):
    _, run = first_run
    path, result = exported
    assert path.read_bytes() == (run / "steps/04-export/model.onnx").read_bytes()
    assert sorted(p.name for p in path.parent.iterdir()) == ["digits.onnx", "distilled"]  # no temporary left
    rep = result["onnx"]
    assert rep["path"] == result["out"] == str(path) and rep["file_bytes"] == path.stat().st_size
    assert rep["max_diff"] < 1e-4 and rep["batch_sizes"] == [1, 3]
    import onnxruntime as ort

    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})[0]
    with torch.inference_mode():
        ref = resolve_model(str(distilled[0] / "model"), ARCH)(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_bench_measures_torch_and_onnxruntime(first_run, exported, tmp_path):
    _, run = first_run
    onnx_path, _ = exported
    before, after = str(run / "steps/01-finetune/model"), str(onnx_path.parent / "distilled/model")
    out = tmp_path / "bench.json"
    result = _json(["bench", before, after, "--arch", ARCH, "--shape", "1,1,8,8", "--onnx", "-", str(onnx_path),
                    "--batch-sizes", "1", "2", "--runs", "3", "--warmup", "1", "-o", str(out)])
    stages = result["stages"]
    assert set(stages[before]) == {"torch_bs1", "torch_bs2"}
    assert set(stages[after]) == {"torch_bs1", "torch_bs2", "onnxruntime_bs1", "onnxruntime_bs2"}
    for row in stages.values():
        for lat in row.values():
            assert 0 < lat["p50_ms"] <= lat["p90_ms"] < 1000
    saved = json.loads(out.read_text())
    assert saved["metrics"]["stages"] == stages and saved["options"]["runs"] == result["runs"] == 3


def test_report_compares_models_with_the_runs_numbers(first_run, distilled, tmp_path):
    _, run = first_run
    out = tmp_path / "report"
    before, after = str(run / "steps/01-finetune/model"), str(distilled[0] / "model")
    result = _json(["report", before, after, "--arch", ARCH, "--data", DATA, "--seed", "3",
                    "--shape", "1,1,8,8", "-o", str(out)])
    assert result["files"] == [str(out / f) for f in ("report.md", "report.html", "widths.png", "tradeoff.png",
                                                      "confusion.png")]
    assert all(Path(f).is_file() for f in result["files"])
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for stage, folder in ((before, "01-finetune"), (after, "03-distill")):
        m = record(run / "steps" / folder)["metrics"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {stage} |"))
        assert f" {m['params'] / 1e6:.3f}M | {m['macs'] / 1e6:.3f}M |" in row
        assert f" {m['eval']['accuracy']:.3f} | {m['eval']['precision']:.3f} |" in row
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_run_json_summarises_the_run_directory(first_run, tmp_path):
    tmp, run = first_run
    result = _json(["run", str(config(tmp)), "--out", str(run)])
    assert [s["name"] for s in result["steps"]] == NAMES and {s["status"] for s in result["steps"]} == {"skipped"}
    by_name = {s["name"]: s for s in result["steps"]}
    for name in NAMES:
        rec = record(run / "steps" / name)
        assert all((run / f).is_file() for f in by_name[name]["artefacts"])
        assert by_name[name]["seconds"] == round(rec["seconds"], 3)
    assert "steps/04-export/model.onnx" in by_name["04-export"]["artefacts"]
    assert by_name["03-distill"]["metrics"]["eval"] == record(run / "steps/03-distill")["metrics"]["eval"]
    assert (by_name["04-export"]["metrics"]["onnx"]["model"]["max_diff"]
            == record(run / "steps/04-export")["metrics"]["onnx"]["model"]["max_diff"])
    plan = _json(["run", str(config(tmp, epochs=4)), "--out", str(run), "--dry-run"])
    assert plan["dry_run"] and [s["status"] for s in plan["steps"]] == ["up to date"] * 3 + ["will run"] * 4


@pytest.mark.parametrize("cmd", ["demo", "groups", "prune", "distill", "export", "bench", "report", "run"])
def test_help_shows_a_worked_example(cmd, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([cmd, "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "examples" in text and f"  fxslim {cmd} " in text and "--json" in text


@pytest.fixture
def saved(first_run):
    return str(first_run[1] / "steps/02-prune/model")


@pytest.mark.parametrize("argv, words", [
    (["export", "digits", "-o", "OUT", "--opset", "3"], "--opset: Input should be greater than or equal to 7"),
    (["distill", "digits", "--teacher", "digits", "--alpha", "2", "-o", "OUT"], "--alpha: Input should be less"),
    (["distill", "digits", "--teacher", "digits", "--data", "cifar", "-o", "OUT"], "cannot resolve data spec"),
    (["distill", "torchvision:resnet18", "--teacher", "digits", "-o", "OUT"], "needs training data: give --data"),
    (["distill", "digits", "-o", "OUT"], "the following arguments are required: --teacher"),
    (["bench", "resnet18"], "cannot resolve model spec 'resnet18'"),
    (["bench", "SAVED"], "is a saved fxslim directory: give --arch"),
    (["bench", "digits", "--onnx", "nowhere.onnx"], "--onnx: 'nowhere.onnx' is not a file"),
    (["report", "digits", "-o", "OUT", "--runs", "-1"], "must be >= 0"),
    (["export", "SAVED", "--arch", ARCH, "--shape", "1,3,8,8", "-o", "OUT"], "does not run on example inputs"),
    (["export", "digits", "-o", "EXISTING"], "already exists; pass --force"),
    (["export", "digits", "-o", "EXISTING/m.onnx"], "EXISTING' is a file, not a folder"),
    (["report", "digits", "-o", "MINE", "--force"], "holds files that no fxslim command wrote"),
])
def test_bad_spec_option_or_output_is_one_line_before_any_work(argv, words, saved, tmp_path, capsys, monkeypatch):
    (tmp_path / "EXISTING").write_text("mine")
    (tmp_path / "MINE").mkdir()
    (tmp_path / "MINE" / "notes.txt").write_text("mine")
    monkeypatch.setitem(steps.STEPS, argv[0] if argv[0] != "bench" else "benchmark", None)  # no step may run
    argv = [str(tmp_path / a) if a.split("/")[0] in ("OUT", "EXISTING", "MINE") else saved if a == "SAVED" else a
            for a in argv]
    try:
        rc = cli.main([*argv, "--quiet"])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXISTING", "MINE"]
    assert (tmp_path / "EXISTING").read_text() == "mine" and [p.name for p in (tmp_path / "MINE").iterdir()] == [
        "notes.txt"]


def test_a_failed_step_leaves_nothing(tmp_path, capsys, monkeypatch):
    def broken(ctx, opts, folder):
        (folder / "model.onnx").write_text("half")  # written, then the step fails
        raise ExportError("simulated failure")

    monkeypatch.setitem(steps.STEPS, "export", broken)
    assert cli.main(["export", "digits", "-o", str(tmp_path / "d" / "m.onnx"), "--quiet"]) == 2
    assert "simulated failure" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # neither the file, nor its temporary folder, nor the folder made for it


def test_groups_and_prune_json_match_the_api(tmp_path, capsys):
    import fxslim
    from fxslim.runtime.measure import count_macs, count_params

    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # the command's own input
    groups = fxslim.channel_groups(resolve_model(ARCH), x)
    result = _json(["groups", ARCH, "--shape", "1,1,8,8"])
    assert [(g["id"], g["size"], g["prunable"]) for g in result["groups"]] == [
        (g.id, g.size, g.prunable) for g in groups]
    out = tmp_path / "small"
    result = _json(["prune", ARCH, "--shape", "1,1,8,8", "--ratio", "0.5", "--ignore", "fc", "--runs", "2",
                    "--save", str(out)])
    small = fxslim.load(out, resolve_model(ARCH))
    assert result["saved"] == str(out) and result["models"]["pruned"]["params"] == count_params(small)
    assert result["models"]["pruned"]["macs"] == count_macs(small, x) < result["models"]["original"]["macs"]
    weights = (out / "weights.safetensors").read_bytes()  # never replaced without --force
    assert cli.main(["prune", ARCH, "--shape", "1,1,8,8", "--ratio", "0.3", "--save", str(out), "--quiet"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "weights.safetensors").read_bytes() == weights


def test_hugging_face_directory_groups_and_prune(tmp_path, capsys):
    """`hf:DIR` (save_pretrained output): token-id inputs of the default shape, heads / MLP /
    hidden groups, and a pruned save that loads back as the same class with fewer params."""
    T = pytest.importorskip("transformers")
    import fxslim
    from fxslim.pipeline.specs import resolve_inputs

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    spec = f"hf:{tmp_path / 'tiny'}"
    model = resolve_model(spec)
    (ids,) = resolve_inputs(None, None, spec)
    assert type(model) is T.LlamaForCausalLM and ids.shape == (1, 16) and ids.dtype == torch.int64
    groups = _json(["groups", spec])["groups"]
    assert [(g["size"], g["prunable"]) for g in groups] == [
        (g.size, g.prunable) for g in fxslim.channel_groups(model, ids)]
    assert sum(g["prunable"] for g in groups) >= 3  # heads, MLP, hidden size
    result = _json(["prune", str(tmp_path / "tiny"), "--ratio", "0.5", "--save", str(tmp_path / "small")])
    small = fxslim.load(tmp_path / "small", resolve_model(spec))
    assert type(small) is T.LlamaForCausalLM and small.config.num_key_value_heads == 1
    assert result["models"]["pruned"]["params"] == sum(p.numel() for p in small.parameters())
    assert result["models"]["pruned"]["params"] < result["models"]["original"]["params"]
