"""Sparse-training regularisers to add to a training loss (and to the distillation pass).

* ``l1_penalty``: sum |w| over Conv/Linear weights;
* ``bn_scale_penalty``: sum |gamma| over BatchNorm scales (network slimming: drives
  whole channels towards zero so that BN-scale importance can find them);
* ``GroupLasso``: sum over channel units of the L2 norm of everything the unit
  removes, across every member of its fxslim channel group (coupled layers shrink
  together, so what it zeroes can really be removed).

Example:
    >>> lasso = GroupLasso(gm, fxslim.analyze(gm))
    >>> loss = ce(gm(x), y) + 1e-4 * lasso(gm)
"""

from __future__ import annotations

import torch
from torch import nn

from fxslim.graph.coupling import CouplingGraph

__all__ = ["GroupLasso", "bn_scale_penalty", "l1_penalty"]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |w| over Conv and Linear weights."""
    terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, _WEIGHTED)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def bn_scale_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of |gamma| over BatchNorm layers with affine weights."""
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class GroupLasso:
    """sum over units u of every prunable group: sqrt(sum over members of ||W[u]||^2).

    Args:
        gm: the traced module the penalty is computed on (its parameter names are used).
        cg: its coupling graph.
    """

    def __init__(self, gm: nn.Module, cg: CouplingGraph):
        self.terms = []
        for grp in cg.groups:
            if not grp.prunable:
                continue
            parts = []
            for m in grp.members:
                if m.kind != "param":
                    continue
                units = torch.as_tensor(grp.unit_of[grp.member_class[m]])
                keep = units >= 0
                parts.append((m.target, m.dim, torch.nonzero(keep).flatten(), units[keep]))
            if parts:
                self.terms.append((grp.size, parts))

    def __call__(self, model: nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for size, parts in self.terms:
            acc = None
            for target, dim, idx, units in parts:
                w = model.get_parameter(target)
                other = [d for d in range(w.dim()) if d != dim]
                sq = w.pow(2).sum(dim=other) if other else w.pow(2)
                per_unit = torch.zeros(size, dtype=sq.dtype, device=sq.device).index_add(0, units, sq[idx])
                acc = per_unit if acc is None else acc + per_unit
            total = total + (acc + 1e-12).sqrt().sum()
        return total
