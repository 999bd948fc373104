"""Small helpers shared by the layers."""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["META_ATTR", "as_path", "check_output_file", "folders_made", "fxslim_meta", "gc_paused", "sorted_unique"]

# where a model fxslim pruned into the user's own classes keeps fxslim's record of it
# (a GraphModule keeps the same keys in `gm.meta`): see `fxslim_meta`
META_ATTR = "fxslim_meta"


@contextmanager
def _paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def gc_paused(fn: F) -> F:
    """Run `fn` with Python's cyclic garbage collector paused.

    Graph passes allocate many small objects (fx nodes, proxies, numpy arrays); with a
    large heap (torch, torchvision loaded) the collector's full passes then cost more than
    the pass itself (vit_b_16 analysis: 190 ms with, 64 ms without). Nothing is lost:
    cycles left behind are collected once the collector runs again.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _paused():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def sorted_unique(a: np.ndarray) -> np.ndarray:
    """`np.unique(a)` by sort and compare: numpy 2's default hashing path is ~15x slower
    on the 10^4-10^5 integer arrays the analysis builds."""
    a = np.sort(a, axis=None)
    if a.size == 0:
        return a
    return a[np.concatenate(([True], a[1:] != a[:-1]))]


def as_path(path: Any, error: type[Exception], what: str = "path") -> Path:
    """`path` as a Path, or `error` naming what was passed instead."""
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise error(f"{what} must be a non-empty str or os.PathLike, got {path!r}")
    return Path(path)


def check_output_file(path: Path, overwrite: bool, error: type[Exception]) -> None:
    """Refuse to write a file over a directory, or over an existing file unless asked."""
    if path.is_dir():
        raise error(f"'{path}' is a directory; give a file path. Nothing was written")
    if path.exists() and not overwrite:
        raise error(f"'{path}' already exists; pass overwrite=True to replace it. Nothing was written")


@contextmanager
def folders_made(folder: Path) -> Iterator[None]:
    """Create `folder` and its missing parents; if the body fails, remove the ones made
    here again (only while empty: never anything someone else put there)."""
    made = [f for f in reversed([folder, *folder.parents]) if not f.exists()]
    ok = False
    try:
        for f in made:
            f.mkdir()
        yield
        ok = True
    finally:
        if not ok:
            for f in reversed(made):
                try:
                    f.rmdir()
                except OSError:
                    pass


def fxslim_meta(model: Any) -> dict[str, Any]:
    """fxslim's record on a model it produced, for both forms (empty when there is none).

    A GraphModule (`fxslim.trace`, or a prune that kept the graph) holds it in
    ``gm.meta``; a pruned model in the user's own classes holds the same keys in one
    attribute, ``model.fxslim_meta``: ``fxslim_source`` (sha256 of the original
    architecture), ``fxslim_inputs`` (example input specs), ``fxslim_history`` (the
    prune steps as `save` writes them), ``fxslim_keep`` (per "tensor:dim", the original
    indices kept; `distill` aligns features by it) and pass facts (``fxslim_latency``).
    """
    from torch import fx

    if isinstance(model, fx.GraphModule):
        return model.meta
    record = model.__dict__.get(META_ATTR) if hasattr(model, "__dict__") else None
    return record if isinstance(record, dict) else {}
