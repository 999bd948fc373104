"""save/load: bit-identical round trips, and a typed error for every bad file."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

import fxslim
from fxslim.passes import saveload


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    small = fxslim.prune(fxslim.prune(model, x, 0.5, ignore=["fc"]), x, 0.25)  # two steps
    return small, x


def fresh():
    return torchvision.models.resnet18()


def test_round_trip_is_bit_identical(pruned, tmp_path):
    small, x = pruned
    fxslim.save(small, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["plan.json", "weights.safetensors"]
    plan = json.loads((tmp_path / "m" / "plan.json").read_text())
    assert len(plan["steps"]) == 2 and plan["torch_version"] == torch.__version__
    user = fresh()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    again = fxslim.load(tmp_path / "m", model=user)
    with torch.inference_mode():
        assert torch.equal(again(x), small(x))
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # untouched
    again2 = fxslim.prune(again, x, 0.2)  # a loaded model prunes again
    with torch.inference_mode():
        assert again2(x).shape == (2, 1000)


def _corrupt_cases(tmp_path, small):
    d = tmp_path / "m"
    fxslim.save(small, d)
    return d, d / "plan.json", d / "weights.safetensors"


def test_corrupt_plan(pruned, tmp_path):
    d, plan, _ = _corrupt_cases(tmp_path, pruned[0])
    plan.write_text(plan.read_text()[:100])
    with pytest.raises(fxslim.SaveLoadError, match="not valid JSON"):
        fxslim.load(d, fresh())


def test_truncated_weights(pruned, tmp_path):
    d, plan, w = _corrupt_cases(tmp_path, pruned[0])
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    p = json.loads(plan.read_text())
    p["weights_sha256"] = saveload._sha256(w)  # pass the pairing check, hit the parser
    plan.write_text(json.dumps(p))
    with pytest.raises(fxslim.SaveLoadError, match="corrupt or truncated"):
        fxslim.load(d, fresh())


def test_weights_from_elsewhere(pruned, tmp_path):
    d, _, w = _corrupt_cases(tmp_path, pruned[0])
    t = load_file(str(w))
    t["fc.bias"] = t["fc.bias"] + 1
    save_file(t, str(w))
    with pytest.raises(fxslim.SaveLoadError, match="does not match plan.json"):
        fxslim.load(d, fresh())


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("fc.bias"), "missing tensors"),
    (lambda t: t.__setitem__("extra.weight", torch.zeros(2)), "unexpected tensors"),
    (lambda t: t.__setitem__("fc.bias", torch.zeros(7)), "wrong shapes"),
])
def test_missing_extra_misshapen_tensors(pruned, tmp_path, edit, match):
    d, plan, w = _corrupt_cases(tmp_path, pruned[0])
    t = load_file(str(w))
    edit(t)
    save_file(t, str(w))
    p = json.loads(plan.read_text())
    p["weights_sha256"] = saveload._sha256(w)
    plan.write_text(json.dumps(p))
    with pytest.raises(fxslim.SaveLoadError, match=match):
        fxslim.load(d, fresh())


def test_other_architecture(pruned, tmp_path):
    d, _, _ = _corrupt_cases(tmp_path, pruned[0])
    with pytest.raises(fxslim.SaveLoadError, match="not the architecture"):
        fxslim.load(d, torchvision.models.resnet34())


def test_interrupted_save_leaves_previous_loadable(pruned, tmp_path, monkeypatch):
    small, x = pruned
    d = tmp_path / "m"
    fxslim.save(small, d)
    import safetensors.torch as st

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        fxslim.save(fxslim.prune(small, x, 0.5), d, overwrite=True)
    monkeypatch.undo()
    again = fxslim.load(d, fresh())
    with torch.inference_mode():
        assert torch.equal(again(x), small(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind
    assert sorted(os.listdir(d)) == ["plan.json", "weights.safetensors"]


def _tree(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_save_never_deletes_what_it_did_not_write(pruned, tmp_path, monkeypatch):
    small = pruned[0]
    home = tmp_path / "home"
    (home / "projects" / "important").mkdir(parents=True)
    (home / "projects" / "important" / "thesis.tex").write_text("years of work")
    (home / ".bashrc").write_text("alias ll='ls -l'")
    (home / "notes.txt").write_text("a file, not a folder")
    before = _tree(home)
    for target in (home, home / "projects", home / "notes.txt"):
        with pytest.raises(fxslim.SaveLoadError, match="not empty|not a directory"):
            fxslim.save(small, target)
        assert _tree(home) == before
    monkeypatch.chdir(home / "projects")
    with pytest.raises(fxslim.SaveLoadError, match="not empty"):
        fxslim.save(small, ".")
    assert _tree(home) == before


def test_save_into_the_current_or_an_empty_directory(pruned, tmp_path, monkeypatch):
    small, x = pruned
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    fxslim.save(small, ".")
    assert sorted(os.listdir(empty)) == ["plan.json", "weights.safetensors"]
    with torch.inference_mode():
        assert torch.equal(fxslim.load(".", fresh())(x), small(x))


def test_replacing_an_earlier_save_needs_overwrite(pruned, tmp_path):
    small, x = pruned
    d = tmp_path / "m"
    fxslim.save(small, d)
    (d / "README.md").write_text("the user's notes beside the save")
    other = fxslim.prune(small, x, 0.5)
    with pytest.raises(fxslim.SaveLoadError, match="overwrite=True"):
        fxslim.save(other, d)
    with torch.inference_mode():
        assert torch.equal(fxslim.load(d, fresh())(x), small(x))  # the earlier save is intact
    fxslim.save(other, d, overwrite=True)
    with torch.inference_mode():
        assert torch.equal(fxslim.load(d, fresh())(x), other(x))
    assert sorted(os.listdir(d)) == ["README.md", "plan.json", "weights.safetensors"]


def test_save_to_an_unwritable_place_is_typed_and_leaves_nothing(pruned, tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file" / "sub"  # root writes anywhere: a path through a file fails for anyone
        (tmp_path / "file").write_text("x")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "m"
    before = _tree(tmp_path)
    with pytest.raises(fxslim.SaveLoadError, match="cannot save"):
        fxslim.save(pruned[0], target)
    assert _tree(tmp_path) == before


def test_save_needs_an_fxslim_model(tmp_path):
    with pytest.raises(fxslim.SaveLoadError, match="produced by fxslim"):
        fxslim.save(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_pt2_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    small = fxslim.prune(model, x, 0.5)
    path = fxslim.save_pt2(small, x, tmp_path / "small.pt2")
    prog = torch.export.load(path)
    with torch.inference_mode():
        assert torch.equal(prog.module()(x), small(x))
    with pytest.raises(fxslim.SaveLoadError, match="overwrite=True"):
        fxslim.save_pt2(small, x, path)
    assert fxslim.save_pt2(small, x, path, overwrite=True) == path
    assert sorted(os.listdir(tmp_path)) == ["small.pt2"]
