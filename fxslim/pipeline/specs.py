"""Model, data and example-input specs: strings that name where a model or data comes from.

Models:

* ``digits`` / ``mnist1d``: the built-in examples (`DigitsResNet`, `MNIST1DCNN`, untrained);
* ``torchvision:NAME`` (random init) or ``torchvision:NAME@WEIGHTS`` (e.g. ``@DEFAULT``,
  from torch's local cache: nothing is downloaded that torchvision would not download);
* ``timm:NAME`` (random init);
* ``package.module:function``: a function taking no arguments and returning an nn.Module;
* ``hf:DIR`` or a directory holding a Hugging Face ``config.json`` (``save_pretrained``
  output): the class its config names (``architectures``), loaded from the directory only;
* a saved fxslim directory (``plan.json`` + ``weights.safetensors``): a save holds the
  pruning plan, not the architecture, so it needs the *original* architecture's spec as
  well (``arch:`` in a config, ``--arch`` on the command line).

Data: ``digits`` / ``mnist1d`` (built-in, offline) or ``package.module:function`` taking
no arguments (or ``seed=``) and returning ``(train_loader, val_loader)`` or a dict with
``train`` and ``val``. Example inputs: a shape (``[1, 3, 224, 224]`` or ``"1,3,224,224"``),
``package.module:function`` returning a tensor or a tuple of tensors, or by default the
built-in data's shape. A Hugging Face text model's example inputs are token ids of that
shape (``[1, 16]`` by default), an image model's ``[1, channels, size, size]`` from its
config.

Every failure is a `SpecError` naming the spec and what was tried. Nothing here imports
torch at module import time, so the command line can check specs' forms cheaply.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

from fxslim.errors import SpecError

__all__ = [
    "BUILTIN",
    "MODEL_FORMS",
    "check_data_spec",
    "check_model_spec",
    "parse_shape",
    "resolve_data",
    "resolve_inputs",
    "resolve_model",
]

# built-in name -> (model factory, data loaders factory, example input shape)
BUILTIN = {
    "digits": ("DigitsResNet", "digits_loaders", (1, 1, 8, 8)),
    "mnist1d": ("MNIST1DCNN", "mnist1d_loaders", (1, 1, 40)),
}
MODEL_FORMS = ("a built-in name (digits, mnist1d)", "torchvision:NAME[@WEIGHTS]", "timm:NAME",
               "hf:DIR (a Hugging Face model directory)",
               "a saved fxslim directory (with the original architecture's spec)",
               "package.module:function")
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def parse_shape(text: Any, what: str = "shape") -> tuple[int, ...]:
    """``"1,3,224,224"`` or a list of ints -> a tuple of positive ints, or SpecError."""
    items = text.split(",") if isinstance(text, str) else text
    try:
        shape = tuple(int(str(s).strip()) for s in items)
    except (TypeError, ValueError):
        raise SpecError(f"{what} {text!r} is not a list of integers (e.g. 1,3,224,224)") from None
    if not shape or any(s < 1 for s in shape):
        raise SpecError(f"{what} {text!r} must be one or more positive integers (e.g. 1,3,224,224)")
    return shape


def _is_saved_dir(spec: str) -> bool:
    return (Path(spec) / "plan.json").is_file()


def check_model_spec(spec: str) -> str:
    """The form of a model spec, checked without importing torch: "builtin", "torchvision",
    "timm", "saved" or "callable"; SpecError for anything else."""
    if not isinstance(spec, str) or not spec:
        raise SpecError(f"a model spec must be a non-empty string, got {spec!r}")
    if spec in BUILTIN:
        return "builtin"
    if spec.startswith(("torchvision:", "timm:")):
        if not spec.split(":", 1)[1]:
            raise SpecError(f"model spec '{spec}' names no model (e.g. torchvision:resnet18)")
        return spec.split(":", 1)[0]
    if _hf_dir(spec) is not None:
        return "hf"
    if _is_saved_dir(spec):
        return "saved"
    if _CALLABLE.match(spec):
        return "callable"
    tried = "; ".join(MODEL_FORMS)
    where = " (a path that exists but holds no plan.json)" if Path(spec).exists() else ""
    raise SpecError(f"cannot resolve model spec '{spec}'{where}; tried: {tried}")


def _call(spec: str, what: str, **kwargs: Any) -> Any:
    mod_name, fn_name = spec.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SpecError(f"{what} spec '{spec}': cannot import module '{mod_name}' ({exc})") from exc
    for part in fn_name.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")][:8]
            raise SpecError(f"{what} spec '{spec}': module '{mod_name}' has no '{fn_name}' "
                            f"(it has e.g. {', '.join(names)})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{what} spec '{spec}': '{fn_name}' is not callable")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    return obj(**{k: v for k, v in kwargs.items() if k in params})


def _torchvision(spec: str) -> Any:
    import torchvision

    name, _, weights = spec.split(":", 1)[1].partition("@")
    known = torchvision.models.list_models()
    if name not in known:
        from fxslim._args import closest

        raise SpecError(f"model spec '{spec}': torchvision has no model '{name}'{closest(name, known)} "
                        f"(tried torchvision.models.list_models(), {len(known)} models)")
    try:
        return torchvision.models.get_model(name, weights=weights or None)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise SpecError(f"model spec '{spec}': torchvision could not build it with weights "
                        f"'{weights}': {exc}") from exc


def _timm(spec: str) -> Any:
    try:
        import timm
    except ImportError as exc:
        raise SpecError(f"model spec '{spec}' needs the timm package (pip install timm)") from exc
    name = spec.split(":", 1)[1]
    if not timm.is_model(name):
        from fxslim._args import closest

        raise SpecError(f"model spec '{spec}': timm has no model '{name}'{closest(name, timm.list_models())}")
    return timm.create_model(name, pretrained=False)


def _hf_dir(spec: str) -> Path | None:
    """The directory of a Hugging Face model spec, else None."""
    if spec.startswith(("hf:", "huggingface:")):
        path = Path(spec.split(":", 1)[1])
        if not (path / "config.json").is_file():
            raise SpecError(f"model spec '{spec}': no config.json in '{path}' (a Hugging Face "
                            "model directory, as save_pretrained writes it)")
        return path
    path = Path(spec)
    return path if (path / "config.json").is_file() and not _is_saved_dir(spec) else None


def _hf_config(spec: str | None) -> dict | None:
    path = _hf_dir(spec) if isinstance(spec, str) and spec else None
    if path is None:
        return None
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"model spec '{spec}': cannot read its config.json ({exc})") from exc


def default_shape(spec: str | None) -> tuple[int, ...] | None:
    """Example input shape of a Hugging Face model spec (token ids or an image), else None."""
    cfg = _hf_config(spec)
    if cfg is None:
        return None
    if "image_size" in cfg:
        size = cfg["image_size"]
        size = size if isinstance(size, int) else size[0]
        return (1, cfg.get("num_channels", 3), size, size)
    return (1, 16)


def _token_vocab(spec: str | None) -> int | None:
    cfg = _hf_config(spec)
    return cfg.get("vocab_size") if cfg and "image_size" not in cfg else None


def example_inputs(shape: Any, model: str | None = None) -> tuple:
    """Seeded example inputs of `shape` for `model`: token ids for a Hugging Face text model,
    else standard normal values."""
    import torch

    shape = parse_shape(shape, "inputs shape")
    g = torch.Generator().manual_seed(0)
    vocab = _token_vocab(model)
    if vocab:
        return (torch.randint(0, vocab, shape, generator=g),)
    return (torch.randn(*shape, generator=g),)


def _hf(spec: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise SpecError(f"model spec '{spec}' needs the transformers package (pip install transformers)") from exc
    path = _hf_dir(spec)
    archs = (_hf_config(spec) or {}).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if cls is None:
        raise SpecError(f"model spec '{spec}': transformers {transformers.__version__} has no class "
                        f"'{archs[0]}' (its config.json's architectures)")
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SpecError(f"model spec '{spec}': {cls.__name__}.from_pretrained failed: {exc}") from exc


def resolve_model(spec: str, arch: str | None = None) -> Any:
    """An nn.Module (in eval mode) for a model spec; a saved directory needs `arch`."""
    from torch import nn

    form = check_model_spec(spec)
    if form == "builtin":
        from fxslim.runtime import examples

        model = getattr(examples, BUILTIN[spec][0])()
    elif form == "torchvision":
        model = _torchvision(spec)
    elif form == "timm":
        model = _timm(spec)
    elif form == "hf":
        model = _hf(spec)
    elif form == "saved":
        if not arch:
            raise SpecError(f"model spec '{spec}' is a saved fxslim directory: it holds the pruning plan, "
                            "not the architecture; give the original architecture's spec too "
                            "(arch: in a config, --arch on the command line)")
        if check_model_spec(arch) == "saved":
            raise SpecError(f"arch '{arch}' must name an architecture, not another saved directory")
        import fxslim

        model = fxslim.load(spec, resolve_model(arch))
    else:
        model = _call(spec, "model")
    if not isinstance(model, nn.Module):
        raise SpecError(f"model spec '{spec}' gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def check_data_spec(spec: str) -> str:
    """A data spec's form, checked without importing anything: "builtin" or "callable"."""
    if spec in BUILTIN:
        return "builtin"
    if isinstance(spec, str) and _CALLABLE.match(spec):
        return "callable"
    raise SpecError(f"cannot resolve data spec {spec!r}; tried: a built-in name (digits, mnist1d), "
                    "package.module:function returning (train_loader, val_loader)")


def resolve_data(spec: str | None, seed: int = 0) -> tuple[Any, Any] | None:
    """(train, val) loaders for a data spec, or None for no data."""
    if spec is None:
        return None
    if spec in BUILTIN:
        from fxslim.runtime import examples

        return getattr(examples, BUILTIN[spec][1])(seed=seed)
    check_data_spec(spec)
    out = _call(spec, "data", seed=seed)
    if isinstance(out, dict) and "train" in out:
        out = (out["train"], out.get("val"))
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise SpecError(f"data spec '{spec}' must return (train_loader, val_loader) or "
                        f"{{'train': ..., 'val': ...}}, got {type(out).__name__}")
    return tuple(out)


def _data_shape(data: str) -> list[int]:
    """The shape of one example of the data's first training batch, with batch size 1."""
    train = resolve_data(data)[0]
    try:
        batch = next(iter(train))
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return [1, *x.shape[1:]]
    except (TypeError, AttributeError, IndexError, StopIteration) as exc:
        raise SpecError(f"data spec '{data}': cannot take the example input shape from its first batch "
                        f"({type(exc).__name__}: {exc}); give `inputs:` (--shape)") from None


def resolve_inputs(spec: Any, data: str | None = None, model: str | None = None) -> tuple:
    """Example inputs as a tuple of tensors, from a shape, a callable spec, the built-in data
    (or built-in model) named, or else the shape of the data's first batch (batch size 1)."""
    import torch

    if spec is None:
        for name in (data, model):
            if name in BUILTIN:
                spec = list(BUILTIN[name][2])
                break
        else:
            if default_shape(model):
                spec = list(default_shape(model))
            elif data is None:
                raise SpecError("no example inputs: give `inputs:` (a shape such as [1, 3, 224, 224], or "
                                "package.module:function) — they cannot be guessed for this model and data")
            else:
                spec = _data_shape(data)
    if isinstance(spec, str) and _CALLABLE.match(spec):
        out = _call(spec, "inputs")
        out = out if isinstance(out, tuple) else tuple(out) if isinstance(out, list) else (out,)
        if not out or not all(isinstance(t, torch.Tensor) for t in out):
            raise SpecError(f"inputs spec '{spec}' must return a tensor or a tuple of tensors")
        return out
    return example_inputs(spec, model)
