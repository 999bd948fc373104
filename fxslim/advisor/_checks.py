"""What `fxslim.advise` accepts, checked before any work (every failure an `ArgumentError`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fxslim import _args as A
from fxslim.advisor.recipes import Recipe, default_recipes
from fxslim.errors import ArgumentError
from fxslim.runtime.train import check_training_args

__all__ = ["KINDS", "check_advise_args"]

KINDS = ("latency", "macs", "params")


def check_advise_args(
    model,
    train_data,
    val_data,
    targets,
    target_kind,
    budget,
    seeds,
    recipes,
    features,
    prune_options,
    threads,
    latency_runs,
    lr,
) -> tuple[list[float], list[int], list[Recipe], dict[str, Any]]:
    """(targets, seeds, recipes, prune options) in their checked forms."""
    A.check_module("model", model)
    if val_data is None:
        raise ArgumentError("val_data is required: the advisor measures every recipe on it")
    A.positive_int("budget (training epochs)", budget)
    check_training_args(model, train_data, val_data, budget, lr, 0.0, None, None, None)
    if isinstance(targets, (int, float)):
        targets = [targets]
    if not isinstance(targets, Sequence) or isinstance(targets, str) or not targets:
        raise ArgumentError(
            f"targets must be a non-empty list of fractions in (0, 1), got {targets!r}"
        )
    targets = [A.fraction(f"targets[{i}]", t, zero=False) for i, t in enumerate(targets)]
    if len(set(targets)) != len(targets):
        raise ArgumentError(f"targets repeat a value: {targets}")
    A.choice("target_kind", target_kind, KINDS)
    if isinstance(seeds, int):
        seeds = [seeds]
    if (
        not isinstance(seeds, Sequence)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ArgumentError(f"seeds must be a non-empty list of distinct ints, got {seeds!r}")
    recipes = default_recipes() if recipes is None else recipes
    if (
        not isinstance(recipes, Sequence)
        or not recipes
        or not all(isinstance(r, Recipe) for r in recipes)
    ):
        raise ArgumentError(
            "recipes must be a non-empty list of fxslim.advisor.Recipe (default_recipes() to extend)"
        )
    names = [r.name for r in recipes]
    for r in recipes:
        if (
            not isinstance(r.name, str)
            or not r.name
            or "/" in r.name
            or r.name == "original"
            or not callable(r.fn)
        ):
            raise ArgumentError(
                f"recipe {r.name!r}: a name (not 'original', no '/') and a callable fn are needed"
            )
    if len(set(names)) != len(names):
        raise ArgumentError(f"recipe names repeat: {names}")
    if features is not None:
        A.module_paths(model, features, "features")
    if prune_options is not None and not isinstance(prune_options, dict):
        raise ArgumentError(
            f"prune_options must be a dict of fxslim.prune keywords, got {type(prune_options).__name__}"
        )
    bad = {"ratio", "target_macs", "target_params", "target_latency", "dry_run"} & set(
        prune_options or {}
    )
    if bad:
        raise ArgumentError(
            f"prune_options: {sorted(bad)} are set by the advisor (targets=, target_kind=)"
        )
    A.positive_int("threads", threads)
    A.positive_int("latency_runs", latency_runs)
    return targets, list(seeds), list(recipes), dict(prune_options or {})
