"""Every model / data / inputs spec form resolves; an unresolvable one is a SpecError
naming the spec and what was tried."""

from __future__ import annotations

import pytest
import torch

import fxslim
from fxslim.errors import SpecError
from fxslim.pipeline.specs import check_model_spec, resolve_data, resolve_inputs, resolve_model

torch.set_num_threads(1)


def test_builtin_and_callable_models():
    assert type(resolve_model("digits")).__name__ == "DigitsResNet"
    assert type(resolve_model("mnist1d")).__name__ == "MNIST1DCNN"
    m = resolve_model("tests.pipeline.models:tiny_digits")
    assert m.fc.in_features == 16 and not m.training


def test_torchvision_and_timm_models():
    assert type(resolve_model("torchvision:resnet18")).__name__ == "ResNet"
    m = resolve_model("timm:resnet10t")
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_saved_directory_needs_and_uses_the_architecture(tmp_path):
    model = resolve_model("tests.pipeline.models:tiny_digits")
    x = torch.randn(2, 1, 8, 8)
    small = fxslim.prune(model, x[:1], 0.5, ignore=["fc"])
    fxslim.save(small, tmp_path / "s")
    assert check_model_spec(str(tmp_path / "s")) == "saved"
    with pytest.raises(SpecError, match="original architecture"):
        resolve_model(str(tmp_path / "s"))
    again = resolve_model(str(tmp_path / "s"), arch="tests.pipeline.models:tiny_digits")
    assert torch.equal(again(x), small(x))


def test_data_and_inputs_specs():
    train, _ = resolve_data("digits")
    assert next(iter(train))[0].shape[1:] == (1, 8, 8)
    train, _ = resolve_data("tests.pipeline.models:digits_data", seed=1)
    assert train.batch_size == 32
    assert resolve_inputs(None, "digits")[0].shape == (1, 1, 8, 8)
    assert resolve_inputs([2, 3, 4, 4])[0].shape == (2, 3, 4, 4)
    assert resolve_inputs("tests.pipeline.models:digits_inputs")[0].shape == (1, 1, 8, 8)


@pytest.mark.parametrize("spec, words", [
    ("torchvision:resnet1000", ["torchvision:resnet1000", "closest: resnet101"]),
    ("timm:nosuchnet", ["timm:nosuchnet", "timm has no model"]),
    ("resnet18", ["resnet18", "tried:", "torchvision:NAME", "package.module:function"]),
    ("tests.pipeline.models:nothing_here", ["tests.pipeline.models:nothing_here", "has no 'nothing_here'"]),
    ("no_such_package.mod:fn", ["cannot import module 'no_such_package.mod'"]),
    ("tests.pipeline.models:not_a_model", ["gave a int, not a torch.nn.Module"]),
    ("hf:bert-base-uncased", ["hf:bert-base-uncased", "no config.json in 'bert-base-uncased'"]),
])
def test_unresolvable_model_specs_name_the_spec_and_what_was_tried(spec, words):
    with pytest.raises(SpecError) as info:
        resolve_model(spec)
    for w in words:
        assert w in str(info.value)


def test_bad_data_and_shape_specs():
    with pytest.raises(SpecError, match="cannot resolve data spec 'cifar'"):
        resolve_data("cifar")
    with pytest.raises(SpecError, match="not a list of integers"):
        resolve_inputs("1,3,abc")
    with pytest.raises(SpecError, match="cannot be guessed"):
        resolve_inputs(None, None, "torchvision:resnet18")
