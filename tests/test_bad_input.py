"""Every public entry point x wrong types, out-of-range values, unknown names, unwritable and
non-empty paths: a typed FxslimError, raised before any work, and an unchanged file system."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxslim
from fxslim import cli
from fxslim.runtime.examples import fit

X = torch.randn(1, 3, 8, 8)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


M = _model()
SMALL = fxslim.prune(M, X, 0.5)
DATA = [(X, torch.zeros(1, dtype=torch.long))]


def _cases(tmp):
    (tmp / "full").mkdir()
    (tmp / "full" / "thesis.tex").write_text("years of work")
    (tmp / "file.txt").write_text("a file")
    (tmp / "file.onnx").write_text("not ours to replace")
    through_file = tmp / "file.txt" / "out"  # no one can write below a regular file
    return {
        # trace / channel_groups
        "trace: model is a string": lambda: fxslim.trace("resnet18", X),
        "trace: inputs are a string": lambda: fxslim.trace(M, "x"),
        "trace: inputs hold an int": lambda: fxslim.trace(M, [1]),
        "trace: wrong channel count": lambda: fxslim.trace(M, torch.randn(1, 5, 8, 8)),
        "trace: unknown leaf path": lambda: fxslim.trace(M, X, leaf_paths=["nosuch"]),
        "trace: leaf module by name": lambda: fxslim.trace(M, X, leaf_modules=["Conv2d"]),
        "trace: concrete_args not a dict": lambda: fxslim.trace(M, X, concrete_args=[1]),
        "channel_groups: model is None": lambda: fxslim.channel_groups(None, X),
        # prune_channels
        "prune_channels: unknown layer": lambda: fxslim.prune_channels(M, X, {"nosuch": [1]}),
        "prune_channels: indices are a string": lambda: fxslim.prune_channels(M, X, {"0": "ab"}),
        "prune_channels: request is a list": lambda: fxslim.prune_channels(M, X, [("0", [1])]),
        "prune_channels: index out of range": lambda: fxslim.prune_channels(M, X, {"0": [99]}),
        "prune_channels: unknown keyword": lambda: fxslim.prune_channels(M, X, {"0": [1]}, nosuch=1),
        # prune
        "prune: ratio is a string": lambda: fxslim.prune(M, X, "abc"),
        "prune: ratio below 0": lambda: fxslim.prune(M, X, -0.1),
        "prune: ratio 1": lambda: fxslim.prune(M, X, 1.0),
        "prune: ratio is NaN": lambda: fxslim.prune(M, X, float("nan")),
        "prune: ratio is a bool": lambda: fxslim.prune(M, X, True),
        "prune: unknown importance": lambda: fxslim.prune(M, X, 0.5, importance="foo"),
        "prune: importance is a number": lambda: fxslim.prune(M, X, 0.5, importance=3),
        "prune: unknown ignored layer": lambda: fxslim.prune(M, X, 0.5, ignore=["nosuch"]),
        "prune: ignored module not in the model": lambda: fxslim.prune(M, X, 0.5, ignore=[nn.Linear(1, 1)]),
        "prune: unknown override": lambda: fxslim.prune(M, X, 0.5, overrides={"nosuch": 0.3}),
        "prune: override out of range": lambda: fxslim.prune(M, X, 0.5, overrides={"0": 2}),
        "prune: overrides not a mapping": lambda: fxslim.prune(M, X, 0.5, overrides=["0"]),
        "prune: round_to 0": lambda: fxslim.prune(M, X, 0.5, round_to=0),
        "prune: round_to a float": lambda: fxslim.prune(M, X, 0.5, round_to=8.0),
        "prune: max_ratio 2": lambda: fxslim.prune(M, X, 0.5, max_ratio=2),
        "prune: threshold a string": lambda: fxslim.prune(M, X, threshold="low"),
        "prune: target_macs 0": lambda: fxslim.prune(M, X, target_macs=0.0),
        "prune: target_params 1.5": lambda: fxslim.prune(M, X, target_params=1.5),
        "prune: two targets": lambda: fxslim.prune(M, X, target_macs=0.5, target_params=0.5),
        "prune: latency options not a mapping": lambda: fxslim.prune(M, X, target_latency=0.5, latency_options=[1]),
        "prune: unknown latency option": lambda: fxslim.prune(M, X, target_latency=0.5,
                                                              latency_options={"nosuch": 1}),
        "prune: unknown keyword": lambda: fxslim.prune(M, X, 0.5, nosuch=1),
        "thin_copy: ratio 3": lambda: fxslim.thin_copy(M, X, ratio=3),
        # export
        "export_onnx: model is a string": lambda: fxslim.export_onnx("m", X, tmp / "a.onnx"),
        "export_onnx: tol a string": lambda: fxslim.export_onnx(SMALL, X, tmp / "a.onnx", tol="x"),
        "export_onnx: opset a string": lambda: fxslim.export_onnx(SMALL, X, tmp / "a.onnx", opset="17"),
        "export_onnx: path is a directory": lambda: fxslim.export_onnx(SMALL, X, tmp / "full"),
        "export_onnx: path is an int": lambda: fxslim.export_onnx(SMALL, X, 5),
        "export_onnx: existing file": lambda: fxslim.export_onnx(SMALL, X, tmp / "file.onnx"),
        "export_onnx: unwritable": lambda: fxslim.export_onnx(SMALL, X, through_file / "a.onnx"),
        # save / load
        "save: not an fxslim model": lambda: fxslim.save(M, tmp / "s"),
        "save: non-empty folder": lambda: fxslim.save(SMALL, tmp / "full"),
        "save: onto a file": lambda: fxslim.save(SMALL, tmp / "file.txt"),
        "save: unwritable": lambda: fxslim.save(SMALL, through_file),
        "save: path is None": lambda: fxslim.save(SMALL, None),
        "save_pt2: existing file": lambda: fxslim.save_pt2(SMALL, X, tmp / "file.txt"),
        "save_pt2: unwritable": lambda: fxslim.save_pt2(SMALL, X, through_file / "m.pt2"),
        "load: missing folder": lambda: fxslim.load(tmp / "nosuch", _model()),
        "load: not a save": lambda: fxslim.load(tmp / "full", _model()),
        "load: model is a string": lambda: fxslim.load(tmp / "full", "resnet18"),
        # distillation and fine-tuning (the data need not be real: nothing may start)
        "distill: student is a string": lambda: fxslim.distill("s", M, DATA),
        "distill: no teacher": lambda: fxslim.distill(_model(), [], DATA),
        "distill: data is a string": lambda: fxslim.distill(_model(), M, "digits"),
        "distill: epochs 0": lambda: fxslim.distill(_model(), M, DATA, epochs=0),
        "distill: epochs a string": lambda: fxslim.distill(_model(), M, DATA, epochs="5"),
        "distill: unknown lr word": lambda: fxslim.distill(_model(), M, DATA, lr="fast"),
        "distill: negative lr": lambda: fxslim.distill(_model(), M, DATA, lr=-1e-3),
        "distill: alpha 2": lambda: fxslim.distill(_model(), M, DATA, alpha=2),
        "distill: temperature 0": lambda: fxslim.distill(_model(), M, DATA, temperature=0),
        "distill: unknown feature layer": lambda: fxslim.distill(_model(), M, DATA, features=["nosuch"]),
        "distill: teacher weights per teacher": lambda: fxslim.distill(_model(), M, DATA, teacher_weights=[1, 2]),
        "distill: unknown device": lambda: fxslim.distill(_model(), M, DATA, device="gpu0"),
        "distill: checkpoint dir an int": lambda: fxslim.distill(_model(), M, DATA, checkpoint_dir=3),
        "fit: epochs -1": lambda: fit(_model(), DATA, epochs=-1),
        "fit: lr a string": lambda: fit(_model(), DATA, lr="1e-3"),
        # measuring
        "compare: a list": lambda: fxslim.compare([M], X),
        "compare: not a module": lambda: fxslim.compare({"a": "m"}, X),
        "compare: runs 0": lambda: fxslim.compare({"a": M}, X, runs=0),
        "measure_latency: runs a string": lambda: fxslim.measure_latency(M, X, runs="many"),
        "measure_latency: not callable": lambda: fxslim.measure_latency(3, X),
        "count_macs: model is a string": lambda: fxslim.count_macs("m", X),
        "count_params: model is a string": lambda: fxslim.count_params("m"),
    }


def _names():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return list(_cases(Path(d)))


def _tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", _names())
def test_bad_input_is_a_typed_error_and_changes_nothing(case, tmp_path):
    call = _cases(tmp_path)[case]
    before = _tree(tmp_path)
    state = {k: v.clone() for k, v in M.state_dict().items()}
    with pytest.raises(fxslim.FxslimError) as info:
        call()
    assert str(info.value)  # says what was wrong
    assert _tree(tmp_path) == before, "the file system changed"
    assert all(torch.equal(v, M.state_dict()[k]) for k, v in state.items()), "the user's model changed"


def test_argument_errors_name_what_is_accepted():
    with pytest.raises(fxslim.ArgumentError, match=r"ratio must be a number in \[0, 1\)"):
        fxslim.prune(M, X, "abc")
    with pytest.raises(fxslim.ArgumentError, match=r"no module 'layer9' \(closest: layer2, layer1\)"):
        fxslim.prune(_named(), X, ignore=["layer9"])
    with pytest.raises(fxslim.ArgumentError, match="importance must be one of.*closest: l1"):
        fxslim.prune(M, X, importance="l11")
    with pytest.raises(ValueError):  # generic handlers still catch them
        fxslim.prune(M, X, -1.0)


def _named():
    model = nn.Sequential()
    model.add_module("layer1", nn.Conv2d(3, 8, 1))
    model.add_module("layer2", nn.Conv2d(8, 4, 1))
    return model.eval()


def test_a_string_is_one_ignored_path_not_its_letters():
    model = _named()
    kept = fxslim.prune(model, X, 0.5, ignore="layer1")
    assert kept.get_submodule("layer1").out_channels == 8
    assert fxslim.prune(model, X, 0.5).get_submodule("layer1").out_channels == 4


def test_cli_rejects_an_unknown_ignored_layer(capsys):
    rc = cli.main(["prune", "torchvision:resnet18", "--shape", "1,3,32,32", "--ignore", "nosuchlayer"])
    err = capsys.readouterr().err
    assert rc == 2 and "no module 'nosuchlayer'" in err

