"""The advisor's recipes: ways to turn the original model into one that meets a target.

A `Recipe` is a name and a callable ``fn(ctx) -> RecipeOutput`` (or a bare module); the
`RecipeContext` hands it the teacher, the data, the target, the training budget (the same
epochs for every recipe), the seed and the target's one-shot pruned model, so every
recipe that starts from pruning starts from the same pruned weights for a given target.
Each training recipe runs `fxslim.runtime.train.train` (through `fxslim.distill` for the
KD recipes) with ``lr="auto"``: every recipe gets the learning rate its own short trials
choose.

The built-in list (`default_recipes`), cheapest first:

* ``prune-only``: the pruned model, no training (what pruning alone costs);
* ``fine-tune``: cross-entropy on the labels;
* ``logit-kd``: logit distillation (alpha 0.9, T 4);
* ``feature-kd``: logit + plan-aligned feature distillation;
* ``thin-student``: the pruned architecture re-initialised, distilled (logit KD): did
  pruning keep useful weights, or did distillation do the work?
* ``iterative-kd``: prune in `steps` steps to the same MACs (or params) as the one-shot
  prune, distilling between steps; the epochs are split over the steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fxslim.passes.distill import DistillResult, distill, reinitialise
from fxslim.passes.schedule import prune_iteratively
from fxslim.runtime.train import labels_only, train
from fxslim.utils import fxslim_meta

__all__ = ["Recipe", "RecipeContext", "RecipeOutput", "choose_features", "default_recipes"]

# Policy fields that `prune_iteratively` takes from the advisor's prune options
_ITERATIVE_KEYS = ("ignore", "round_to", "importance", "global_ranking", "max_ratio")


@dataclass
class RecipeOutput:
    """A recipe's result: the model, its per-epoch history, the learning rates used."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)


@dataclass
class RecipeContext:
    """What a recipe gets: read `pruned()` for a fresh copy of the target's pruned model."""

    teacher: nn.Module
    example_inputs: Any
    train_data: Iterable
    val_data: Iterable
    target_kind: str
    target: float
    epochs: int
    seed: int
    pruned_model: nn.Module
    macs_fraction: float
    params_fraction: float
    features: list[str] = field(default_factory=list)
    prune_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    lr: float | str | Sequence[float] = "auto"

    def pruned(self) -> nn.Module:
        """A copy of the target's one-shot pruned model (the same start for every recipe)."""
        return copy.deepcopy(self.pruned_model)

    def distill(self, student: nn.Module, **kwargs: Any) -> DistillResult:
        """`fxslim.distill` from the teacher with this context's data, budget and seed."""
        kwargs.setdefault("epochs", self.epochs)
        kwargs.setdefault("lr", self.lr)
        return distill(
            student,
            self.teacher,
            self.train_data,
            self.val_data,
            seed=self.seed,
            progress=self.progress,
            **kwargs,
        )


@dataclass
class Recipe:
    """A named way to reach a target. `cost` ranks recipes by training cost: among the
    recipes within noise of the best, the advisor recommends the lowest cost (then the
    shortest measured training time)."""

    name: str
    fn: Callable[[RecipeContext], RecipeOutput | nn.Module]
    cost: float = 1.0
    description: str = ""


def _kd(res: DistillResult) -> RecipeOutput:
    return RecipeOutput(res.student, res.history, [res.lr])


def prune_only(ctx: RecipeContext) -> RecipeOutput:
    return RecipeOutput(ctx.pruned())


def fine_tune(ctx: RecipeContext) -> RecipeOutput:
    res = train(
        ctx.pruned(),
        labels_only,
        ctx.train_data,
        ctx.val_data,
        epochs=ctx.epochs,
        seed=ctx.seed,
        lr=ctx.lr,
        progress=ctx.progress,
    )
    return RecipeOutput(res.model, res.history, [res.lr])


def logit_kd(ctx: RecipeContext) -> RecipeOutput:
    return _kd(ctx.distill(ctx.pruned()))


def feature_kd(ctx: RecipeContext) -> RecipeOutput:
    return _kd(ctx.distill(ctx.pruned(), features=ctx.features or None))


def thin_student(ctx: RecipeContext) -> RecipeOutput:
    return _kd(ctx.distill(reinitialise(ctx.pruned(), ctx.seed)))


def iterative(steps: int = 2) -> Callable[[RecipeContext], RecipeOutput]:
    """Prune in `steps` steps to the one-shot prune's MACs (params for a params target),
    logit-distilling after each step; the epochs are split over the steps (the same total)."""

    def run(ctx: RecipeContext) -> RecipeOutput:
        n = max(1, min(steps, ctx.epochs))
        out = RecipeOutput(ctx.teacher)

        def recover(model: nn.Module, k: int) -> nn.Module:
            extra = 1 if k > n - ctx.epochs % n else 0  # the remainder goes to the last steps
            res = ctx.distill(model, epochs=ctx.epochs // n + extra)
            done = len(out.history)
            out.history += [h | {"epoch": done + i, "step": k} for i, h in enumerate(res.history)]
            out.lrs.append(res.lr)
            return res.student

        goal = (
            {"target_params": ctx.params_fraction}
            if ctx.target_kind == "params"
            else {"target_macs": ctx.macs_fraction}
        )
        opts = {k: v for k, v in ctx.prune_options.items() if k in _ITERATIVE_KEYS}
        out.model = prune_iteratively(
            ctx.teacher, ctx.example_inputs, steps=n, callback=recover, **goal, **opts
        )
        return out

    return run


def default_recipes(steps: int = 2) -> list[Recipe]:
    """The built-in recipes (see the module doc); a list to change or extend."""
    return [
        Recipe("prune-only", prune_only, 0.0, "prune, no training"),
        Recipe("fine-tune", fine_tune, 1.0, "prune, then fine-tune on the labels"),
        Recipe("logit-kd", logit_kd, 2.0, "prune, then logit distillation"),
        Recipe("feature-kd", feature_kd, 2.5, "prune, then logit + feature distillation"),
        Recipe(
            "thin-student", thin_student, 2.0, "the pruned architecture re-initialised, distilled"
        ),
        Recipe(
            "iterative-kd", iterative(steps), 3.0, f"prune in {steps} steps, distilling after each"
        ),
    ]


def choose_features(pruned: nn.Module, teacher: nn.Module, most: int = 2) -> list[str]:
    """Layers for feature KD: pruned conv / linear outputs present in both models, the
    middle one and the last (the channel map comes from the pruning plan, no adapter)."""
    keep = fxslim_meta(pruned).get("fxslim_keep", {})
    names = dict(teacher.named_modules())
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    found = []
    for name, mod in pruned.named_modules():
        if (
            isinstance(mod, kinds)
            and isinstance(names.get(name), kinds)
            and f"{name}.weight:0" in keep
        ):
            found.append(name)
    if len(found) <= most:
        return found
    picks = sorted(
        {found[len(found) // 2], found[-1]}
        if most == 2
        else {found[(i + 1) * len(found) // most - 1] for i in range(most)},
        key=found.index,
    )
    return picks
