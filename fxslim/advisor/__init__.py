"""The advisor: prune, distil or both, and how far? (`fxslim.advise`)

    res = fxslim.advise(model, x, train, val, out_dir="advice", targets=[0.5, 0.25], budget=6)
    print(res)                      # the table, the front, one recommendation per target

Recipes are a list to change or extend::

    from fxslim.advisor import Recipe, default_recipes
    mine = default_recipes() + [Recipe("kd-T2", lambda ctx: ctx.distill(ctx.pruned(), temperature=2).student)]
"""

from fxslim.advisor.core import AdviseResult, advise
from fxslim.advisor.recipes import (
    Recipe,
    RecipeContext,
    RecipeOutput,
    choose_features,
    default_recipes,
)

__all__ = [
    "AdviseResult",
    "Recipe",
    "RecipeContext",
    "RecipeOutput",
    "advise",
    "choose_features",
    "default_recipes",
]
