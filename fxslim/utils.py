"""Small helpers shared by the layers."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["gc_paused", "sorted_unique"]


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
