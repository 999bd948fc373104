"""What symbolic tracing would silently change, kept as it was.

torch.fx runs ``forward`` on proxies and records the tensor ops it sees. Three Python
constructs change behaviour without a tensor op to record:

* ``SomeFunction.apply(x)`` of a custom ``torch.autograd.Function``: fx runs its
  ``forward`` and records the ops inside, so the custom ``backward`` is lost (a
  straight-through estimator's gradient becomes zero). Here the call is recorded as one
  opaque node that calls ``apply`` itself; it has no rule, so the channels through it
  are pinned unless the user registers one (``register_rule(MyFn, elementwise)``).
* ``torch.no_grad()`` / ``enable_grad()`` / ``set_grad_enabled(mode)`` /
  ``inference_mode()`` regions: fx runs their ``__enter__``/``__exit__`` at trace time
  only, so the traced module computes gradients the original never did. Here entering
  and leaving are recorded as graph nodes (marked side-effectful, so dead-code
  elimination keeps them) that do the same at run time, restoring the run-time state.
* module hooks: fx calls the root's ``forward`` directly (its hooks never run) and
  inlines submodules, so hooks that record or change outputs stop firing. Here hooked
  submodules stay whole (one ``call_module`` node, hooks kept on the copy, channels
  pinned); hooks on the root are refused. Parameters with gradient hooks keep their
  module whole the same way (slicing makes new tensors, which would drop the hooks).

And one that changes the user's model: torch.fx hands buffers to ``forward`` as real
tensors, so an in-place update in ``forward`` (``self.count.add_(1)``) runs once at trace
time, on the user's own buffer when weights are shared, and is missing from the graph.
Buffers of traced-through modules are snapshotted; if the trace moved one, it is put
back and the model is traced again with buffers as graph nodes, so the update is
recorded and runs at run time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.autograd import grad_mode

from fxslim.errors import TraceError

__all__ = [
    "apply_of",
    "copy_gradient_hooks",
    "enter_context",
    "exit_context",
    "hooked_modules",
    "recording_semantics",
    "restore_mutated_buffers",
    "snapshot_buffers",
]

_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks_of(mod: nn.Module) -> list[str]:
    found = [t.strip("_").replace("_", " ") for t in _HOOK_TABLES if getattr(mod, t, None)]
    hooked = [n for n, p in mod.named_parameters(recurse=False) if getattr(p, "_backward_hooks", None)]
    if hooked:
        found.append(f"gradient hooks on {', '.join(hooked)}")
    return found


def hooked_modules(model: nn.Module) -> dict[str, str]:
    """{module path: reason} for submodules with hooks; TraceError for hooks on the root."""
    out = {}
    for path, mod in model.named_modules():
        found = _hooks_of(mod)
        if not found:
            continue
        if path == "":
            raise TraceError(
                f"{type(model).__name__} has {' and '.join(found)} on the model itself; torch.fx traces "
                "forward() and would drop them. Remove them before pruning (handle.remove()) and "
                "register them on the result."
            )
        out[path] = f"module '{path}' has {' and '.join(found)} (kept whole so that they still run)"
    return out


def _proxy_in(args: Any) -> fx.Proxy | None:
    found: list[fx.Proxy] = []
    fx.node.map_aggregate(args, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return found[0] if found else None


_APPLY: dict[type, Any] = {}


def apply_of(cls: type) -> Any:
    """The graph target for `cls.apply`: a plain function (torch.fx generates code only for
    Python functions), one per Function class, that names the class it calls."""
    fn = _APPLY.get(cls)
    if fn is None:
        def fn(*args: Any, **kwargs: Any) -> Any:
            return cls.apply(*args, **kwargs)

        fn.__name__, fn.__qualname__, fn.__module__ = "apply", f"{cls.__qualname__}.apply", cls.__module__
        fn.autograd_function = cls
        _APPLY[cls] = fn
    return fn


@fx.node.has_side_effect
def enter_context(kind: str, *args: Any) -> Any:
    """Run time: create and enter a grad-mode context manager (by class name: the
    generated code holds only literals); the graph keeps the object."""
    ctx = getattr(grad_mode, kind)(*args)
    ctx.__enter__()
    return ctx


@fx.node.has_side_effect
def exit_context(ctx: Any) -> None:
    """Run time: leave a context entered by `enter_context` (restores the state before it)."""
    ctx.__exit__(None, None, None)


_GRAD_CONTEXTS = (grad_mode.no_grad, grad_mode.enable_grad, grad_mode.set_grad_enabled, grad_mode.inference_mode)


@contextlib.contextmanager
def recording_semantics(tracer: fx.Tracer) -> Iterator[None]:
    """While `tracer` traces: autograd Functions become opaque nodes, grad-mode regions
    become enter/exit nodes (see the module docstring)."""
    fn_cls = torch.autograd.Function
    original_apply = fn_cls.__dict__["apply"]
    saved = {cls: (cls.__enter__, cls.__exit__) for cls in _GRAD_CONTEXTS}

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        proxy = _proxy_in((args, kwargs))
        if proxy is None:
            return original_apply.__get__(None, cls)(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", apply_of(cls), args, kwargs)

    def patched(cls: type) -> tuple[Any, Any]:
        enter, leave = saved[cls]

        def __enter__(self: Any) -> Any:
            mode = getattr(self, "mode", None)
            self._fxslim_ctx = tracer.create_proxy(
                "call_function", enter_context, (cls.__name__, *(() if mode is None else (mode,))), {})
            return enter(self)  # the trace-time state follows too, and is restored below

        def __exit__(self: Any, *exc: Any) -> Any:
            tracer.create_proxy("call_function", exit_context, (self._fxslim_ctx,), {})
            return leave(self, *exc)

        return __enter__, __exit__

    try:
        fn_cls.apply = classmethod(apply)
        for cls in _GRAD_CONTEXTS:
            cls.__enter__, cls.__exit__ = patched(cls)
        yield
    finally:
        fn_cls.apply = original_apply
        for cls, (enter, leave) in saved.items():
            cls.__enter__, cls.__exit__ = enter, leave


def snapshot_buffers(root: nn.Module, tracer: fx.Tracer) -> list[list[Any]]:
    """[name, buffer, version, copy] for the buffers of modules the trace runs through."""
    out = []
    for path, mod in root.named_modules():
        if path and tracer.is_leaf_module(mod, path):
            continue  # leaves run only at run time: the trace never touches their buffers
        for name, buf in mod.named_buffers(recurse=False):
            out.append([f"{path}.{name}" if path else name, buf, buf._version, buf.detach().clone()])
    return out


def restore_mutated_buffers(snapshot: list[list[Any]]) -> list[str]:
    """Put back the buffers the trace wrote to; their names."""
    moved = []
    for entry in snapshot:
        name, buf, version, copy = entry
        if buf._version != version:
            with torch.no_grad():
                buf.copy_(copy)
            entry[2] = buf._version
            moved.append(name)
    return moved


def copy_gradient_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Register `src`'s parameter gradient hooks on `dst`'s (a deep copy drops them)."""
    for (_, a), (_, b) in zip(src.named_parameters(remove_duplicate=False), dst.named_parameters(remove_duplicate=False)):
        if a is not b:
            for hook in (getattr(a, "_backward_hooks", None) or {}).values():
                b.register_hook(hook)
