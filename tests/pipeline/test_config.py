"""A pipeline config with a misspelt key, a wrong type or an unknown step fails before any
work, with the path of the offending entry and its YAML line; so do bad command lines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fxslim import cli
from fxslim.errors import ConfigError
from fxslim.pipeline.config import load_config

GOOD = """\
model: tests.pipeline.models:tiny_digits
data: digits
inputs: [1, 1, 8, 8]
steps:
  - prune: {ratio: 0.5, ignore: [fc]}
  - export
"""


@pytest.mark.parametrize("old, new, where, msg", [
    ("  - prune: {ratio: 0.5", "  - prune: {ratoi: 0.5", "bad.yaml:5: steps[0].prune.ratoi",
     "unknown key (closest: ratio)"),
    ("data: digits", "dta: digits", "bad.yaml:2: dta", "unknown key (closest: data)"),
    ("{ratio: 0.5,", "{ratio: half,", "bad.yaml:5: steps[0].prune.ratio", "valid number"),
    ("{ratio: 0.5,", "{ratio: 1.5,", "bad.yaml:5: steps[0].prune.ratio", "less than 1"),
    ("inputs: [1, 1, 8, 8]", "inputs: [1, 1, 0, 8]", "bad.yaml:3: inputs", ""),
    ("  - export", "  - exprot", "bad.yaml:6: steps[1]", "unknown step 'exprot' (closest: export)"),
    ("model: tests.pipeline.models:tiny_digits", "model: resnet18", "bad.yaml:1: model", "tried:"),
])
def test_config_errors_name_the_entry_and_its_line(tmp_path, capsys, old, new, where, msg):
    path = tmp_path / "bad.yaml"
    assert old in GOOD
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert f"{tmp_path}/{where}" in text and msg in text, text
    # the command line reports it in one go, exit 2, and nothing is created
    out = tmp_path / "run"
    assert cli.main(["run", str(path), "--out", str(out)]) == 2
    assert where in capsys.readouterr().err
    assert not out.exists()


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD.replace("ratio: 0.5", "ratio: 2").replace("data:", "dat:").replace("- export", "- bench"))
    with pytest.raises(ConfigError, match="3 problem") as info:
        load_config(path)
    assert "steps[0].prune.ratio" in str(info.value)


TOML = """\
model = "digits"
inputs = [1, 1,
          8, 8]

[[steps]]
prune = {ratio = 0.3, ignore = ["fc"]}

[[steps]]
[steps.export]
opset = 18

[[steps]]
report.title = "digits"
"""


@pytest.mark.parametrize("old, new, where", [
    (None, None, None),
    ("ratio = 0.3", 'ratio = "x"', "p.toml:6: steps[0].prune.ratio: Input should be a valid number"),
    ("ignore =", "ingore =", "p.toml:6: steps[0].prune.ingore: unknown key (closest: ignore)"),
    ("opset = 18", "opset = 3", "p.toml:10: steps[1].export.opset: Input should be greater than or equal to 7"),
    ("report.title", "reprot.title", "p.toml:12: steps[2]: unknown step 'reprot' (closest: report)"),
    ("8, 8]", "8, -8]", "p.toml:3: inputs[3]: Input should be greater than 0"),
    ('model = "digits"', 'model = "digits"\ndta = "x"', "p.toml:2: dta: unknown key (closest: data)"),
])
def test_toml_config_errors_name_the_entry_and_its_line(tmp_path, old, new, where):
    path = tmp_path / "p.toml"
    path.write_text(TOML if old is None else TOML.replace(old, new))
    if where is None:
        cfg = load_config(path)
        assert [s.kind for s in cfg.steps] == ["prune", "export", "report"] and cfg.name == "p"
        assert cfg.steps[1].options.opset == 18 and cfg.data == "digits" and cfg.inputs == [1, 1, 8, 8]
        return
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{tmp_path}/{where}" in str(info.value), str(info.value)


def test_saved_model_without_arch_is_a_config_error(tmp_path):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "plan.json").write_text("{}")
    path = tmp_path / "p.yaml"
    path.write_text(f"model: {tmp_path / 'saved'}\nsteps: [report]\n")
    with pytest.raises(ConfigError, match="give `arch:`"):
        load_config(path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxslim", *args], check=False, capture_output=True, text=True, timeout=120)


def test_command_line_fails_fast_and_on_one_line():
    t0 = time.perf_counter()
    r = _cli("--help")
    assert r.returncode == 0 and "run" in r.stdout
    assert time.perf_counter() - t0 < 3.0, "fxslim --help must not import torch"
    assert _cli("--version").stdout.startswith("fxslim ")
    for args, words in [(["demo", "--ratio", "1.5"], "not in [0, 1)"),
                        (["groups", "torchvision:resnet18", "--shape", "1,3,abc"], "not a list of integers"),
                        (["prune", "resnet18"], "cannot resolve model spec 'resnet18'"),
                        (["demo", "--threads", "0"], "must be >= 1")]:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr


def test_unknown_torchvision_model_is_one_line(capsys):
    assert cli.main(["groups", "torchvision:resnet1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fxslim groups: error: SpecError: model spec 'torchvision:resnet1000'")


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_configs_plan_without_running(example, tmp_path, capsys):
    path = EXAMPLES / example
    assert cli.main(["run", str(path), "--dry-run", "--json", "--out", str(tmp_path / "run")]) == 0
    plan = json.loads(capsys.readouterr().out)
    cfg = load_config(path)
    assert [s["kind"] for s in plan["steps"]] == ["source"] + [s.kind for s in cfg.steps]
    assert {s["status"] for s in plan["steps"]} == {"will run"} and not (tmp_path / "run").exists()
    if cfg.model.startswith("timm:"):  # the layers the example ignores exist in the timm model
        from fxslim.pipeline.specs import resolve_model

        names = dict(resolve_model(cfg.model).named_modules())
        for step in cfg.steps:
            if step.kind == "prune":
                assert step.options.ignore and all(p in names for p in step.options.ignore)
