"""`fxslim.advise`: every recipe runs, the table and the front come from the measured rows,
the recommendation is a front member that treats differences inside the noise as none,
a second call resumes without redoing finished runs, bad input fails before any work, and
the `fxslim advise` command runs on the digits data."""

from __future__ import annotations

import io
import json
import math
import statistics
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import fxslim
from fxslim import cli
from fxslim.advisor import Recipe, default_recipes
from fxslim.advisor.stats import dominates, pareto_front, recommend
from fxslim.errors import ArgumentError
from fxslim.runtime.examples import fit
from fxslim.runtime.train import evaluate
from tests.passes.advise_models import TinyNet, loaders

torch.set_num_threads(1)
X = torch.randn(1, 1, 8, 8)
SEEDS = [0, 1]


def counted(calls: list[str]) -> list[Recipe]:
    """The default recipes, each call recorded by name."""

    def wrap(r: Recipe) -> Recipe:
        def fn(ctx):
            calls.append(r.name)
            return r.fn(ctx)

        return Recipe(r.name, fn, r.cost, r.description)

    return [wrap(r) for r in default_recipes()]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    train, _ = loaders()
    return fit(TinyNet(), train, epochs=4, lr=1e-2)


def _advise(teacher, out, recipes, **kw):
    train, val = loaders()
    opts = {
        "targets": [0.5],
        "target_kind": "macs",
        "budget": 2,
        "seeds": SEEDS,
        "lr": 1e-2,
        "onnx": False,
        "latency_runs": 10,
    }
    return fxslim.advise(teacher, X, train, val, out_dir=out, recipes=recipes, **(opts | kw))


@pytest.fixture(scope="module")
def advised(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("advise") / "advice"
    calls: list[str] = []
    return _advise(teacher, out, counted(calls)), calls


def test_every_recipe_runs_and_rows_come_from_records(advised, teacher):
    res, calls = advised
    names = [r.name for r in default_recipes()]
    assert sorted(calls) == sorted(names * len(SEEDS))  # every recipe, every seed, once
    assert [r["recipe"] for r in res.rows] == ["original", *names]
    _, val = loaders()
    for row in res.rows[1:]:
        recs = [r for r in res.records if r["recipe"] == row["recipe"]]
        assert sorted(r["seed"] for r in recs) == SEEDS
        accs = [r["metrics"]["accuracy"] for r in recs]
        assert row["accuracy"] == pytest.approx(statistics.fmean(accs))
        assert row["accuracy_se"] == pytest.approx(statistics.stdev(accs) / math.sqrt(len(accs)))
        # the record is the saved model's measurement: reload it and measure again
        again = fxslim.load(res.out_dir / recs[0]["model"], TinyNet())
        assert evaluate(again, val)["accuracy"] == pytest.approx(
            recs[0]["metrics"]["accuracy"], abs=1e-6
        )
        assert row["params"] == fxslim.count_params(again) < fxslim.count_params(teacher)
        assert math.isfinite(row["torch_ms"]) and row["torch_ms"] > 0
    assert res.rows[0]["accuracy"] == pytest.approx(evaluate(teacher, val)["accuracy"])
    by = {r["recipe"]: r for r in res.rows}
    assert by["prune-only"]["train_seconds"] < by["fine-tune"]["train_seconds"]
    # one architecture per target for the one-shot recipes: one shared latency measurement
    assert (
        len({by[n]["torch_ms"] for n in ("prune-only", "fine-tune", "logit-kd", "feature-kd")}) == 1
    )
    for name in ("results.json", "results.md", "accuracy_latency.png", "training.png"):
        assert (res.out_dir / name).stat().st_size > 0
    saved = json.loads((res.out_dir / "results.json").read_text())
    assert [r["recipe"] for r in saved["rows"]] == [r["recipe"] for r in res.rows]
    assert (res.out_dir / "accuracy_latency.png").read_bytes()[:4] == b"\x89PNG"


def _front_by_hand(rows):
    """Indices of rows that no other row beats on both accuracy and latency."""
    out = []
    for i, r in enumerate(rows):
        beaten = any(
            s["accuracy"] > r["accuracy"] and s["torch_ms"] < r["torch_ms"]
            for j, s in enumerate(rows)
            if j != i
        )
        if not beaten:
            out.append(i)
    return out


def test_front_and_recommendation(advised):
    res, _ = advised
    assert res.front["all"] == _front_by_hand(res.rows)
    # a constructed row beaten on both axes by a measured one is never on the front
    best = max(res.rows[1:], key=lambda r: r["accuracy"])
    worse = dict(
        best, recipe="dominated", accuracy=best["accuracy"] - 0.1, torch_ms=best["torch_ms"] * 2
    )
    rows = [*res.rows, worse]
    assert dominates(best, worse)
    assert len(rows) - 1 not in pareto_front(rows)
    assert pareto_front(rows) == _front_by_hand(rows)
    (rec,) = res.recommendations
    on_front = {res.rows[i]["recipe"] for i in res.front["0.5"]}
    assert rec["recipe"] in on_front and rec["recipe"] != "original"
    assert rec["recipe"] in rec["within_noise"] and rec["text"].startswith("at 0.5x macs")
    assert rec["text"] in res.text


def _row(name, accs, ms=1.0):
    return {
        "target": 0.5,
        "recipe": name,
        "seeds": list(range(len(accs))),
        "accuracies": accs,
        "accuracy": statistics.fmean(accs),
        "accuracy_se": 0.0,
        "torch_ms": ms,
        "train_seconds": 1.0,
        "latency_ratio": 0.5,
    }


def test_recommendation_prefers_the_cheapest_within_noise():
    ref = dict(_row("original", [0.99], 2.0), target=None, seeds=[], accuracies=[])
    costs = {"fine-tune": 1.0, "logit-kd": 2.0}
    # logit KD ahead by 0.1 point on average, with paired differences of +-0.3: no measurable difference
    level = [_row("fine-tune", [0.950, 0.960, 0.955]), _row("logit-kd", [0.953, 0.957, 0.958])]
    rec = recommend(level, 0.5, "latency", costs, 1000, ref)
    assert rec["best"] == "logit-kd" and rec["recipe"] == "fine-tune"
    assert "no measurable difference" in rec["text"]
    # ahead by 2 points on every seed: beyond noise, the best is recommended
    apart = [_row("fine-tune", [0.93, 0.94, 0.935]), _row("logit-kd", [0.95, 0.96, 0.955])]
    rec = recommend(apart, 0.5, "latency", costs, 1000, ref)
    assert rec["recipe"] == "logit-kd" and rec["within_noise"] == ["logit-kd"]
    assert "2.00 ± 0.00 points behind logit-kd" in rec["text"]
    # a row beaten on both axes is off the front, so never recommended even when cheaper
    slow = [
        _row("fine-tune", [0.950, 0.960, 0.955], ms=1.5),
        _row("logit-kd", [0.953, 0.957, 0.958]),
    ]
    assert recommend(slow, 0.5, "latency", costs, 1000, ref)["recipe"] == "logit-kd"


def test_resume_skips_finished_runs(advised, teacher):
    res, _ = advised
    calls: list[str] = []
    again = _advise(teacher, res.out_dir, counted(calls))
    assert calls == [] and again.ran == 0 and again.skipped == 6 * len(SEEDS)
    assert [r["accuracy"] for r in again.rows[1:]] == [r["accuracy"] for r in res.rows[1:]]
    (res.out_dir / "records/t0.5/logit-kd/seed1.json").unlink()  # as if interrupted in that run
    again = _advise(teacher, res.out_dir, counted(calls))
    assert calls == ["logit-kd"] and again.ran == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"targets": [1.5]},
        {"targets": []},
        {"target_kind": "flops"},
        {"seeds": []},
        {"budget": 0},
        {"recipes": [Recipe("a", lambda c: None), Recipe("a", lambda c: None)]},
        {"features": ["conv9"]},
        {"prune_options": {"target_macs": 0.3}},
        {"lr": "fast"},
    ],
)
def test_bad_input_fails_before_any_work(teacher, tmp_path, bad):
    out = tmp_path / "advice"
    with pytest.raises(ArgumentError):
        _advise(
            teacher, out, bad.get("recipes"), **{k: v for k, v in bad.items() if k != "recipes"}
        )
    assert not out.exists()


def test_foreign_folder_and_missing_val_refused(teacher, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    train, _ = loaders()
    with pytest.raises(ArgumentError, match="did not write"):
        _advise(teacher, tmp_path, None)
    with pytest.raises(ArgumentError, match="val_data"):
        fxslim.advise(teacher, X, train, None, out_dir=tmp_path / "new")
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt"
    ]


def test_cli_advise_on_digits(tmp_path):
    out = tmp_path / "advice"
    argv = [
        "advise",
        "tests.passes.advise_models:small_digits",
        "--data",
        "digits",
        "--train-epochs",
        "1",
        "--targets",
        "0.5",
        "--kind",
        "latency",
        "--epochs",
        "1",
        "--seeds",
        "0",
        "--lr",
        "0.01",
        "--latency-runs",
        "10",
        "-o",
        str(out),
        "--json",
        "--quiet",
    ]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(argv) == 0
    result = json.loads(buf.getvalue())
    assert result["command"] == "advise" and result["ran"] == len(default_recipes())
    (rec,) = result["recommendations"]
    assert rec["recipe"] in {result["rows"][i]["recipe"] for i in result["front"]["0.5"]}
    assert all(
        math.isfinite(r["ort_ms"]) for r in result["rows"]
    )  # onnxruntime timed every architecture
    assert (
        json.loads((out / "results.json").read_text())["recommendations"]
        == result["recommendations"]
    )
    for bad in ("1.5", "0"):  # a bad target is one line before any work, worded as a target
        err = io.StringIO()
        with pytest.raises(SystemExit), redirect_stderr(err):
            cli.main(["advise", "digits", "--targets", bad, "-o", str(tmp_path / "x")])
        assert "is not a target: give a fraction of the original" in err.getvalue()
    assert not (tmp_path / "x").exists()
