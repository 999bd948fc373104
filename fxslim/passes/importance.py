"""Channel importance: a score per unit of a channel group (higher = keep).

L1 magnitude: for each parameter member, the L1 norm of each index's slice, divided by
the member's mean so that members of different scale weigh alike; a unit's score is
the mean over its indices and the sum over members.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxslim.graph.coupling import ChannelGroup

__all__ = ["l1_importance"]


def l1_importance(gm: nn.Module, group: ChannelGroup, cache: dict | None = None) -> np.ndarray:
    """Per-unit L1-magnitude importance of `group`, shape (group.size,).

    Args:
        cache: optional dict reused across groups, so that each (tensor, dim) reduction
            runs once even when the tensor is a member of many groups (DenseNet).
    """
    score = np.zeros(group.size, dtype=np.float64)
    for m in group.members:
        if m.kind != "param":
            continue
        key = (m.target, m.dim)
        per_index = cache.get(key) if cache is not None else None
        if per_index is None:
            t = gm.get_parameter(m.target).detach()
            dims = [d for d in range(t.dim()) if d != m.dim]
            per_index = torch.linalg.vector_norm(t, 1, dim=dims).double().cpu().numpy() if dims else t.abs().double().cpu().numpy()
            if cache is not None:
                cache[key] = per_index
        units = group.unit_of[group.member_class[m]]
        ok = units >= 0
        sums = np.bincount(units[ok], weights=per_index[ok], minlength=group.size)
        counts = np.bincount(units[ok], minlength=group.size)
        unit_mean = sums / np.maximum(counts, 1)
        norm = per_index[ok].mean() if ok.any() else 1.0
        score += unit_mean / (norm + 1e-12)
    return score


