"""Params and MACs of a plan without applying it.

Params are exact: a parameter's size after the plan is its size times, for each dim the
plan slices, kept / original.

MACs come from one forward under ``torch.utils.flop_counter`` per node, then scale with
the plan: a Conv/Linear node, module or function form, by its weight's kept fraction
(MACs = weight size x output positions, grouped convs included), a matmul-like node
(matmul, bmm, einsum) by the kept fraction of every distinct index set it touches, an attention op
(`nn.MultiheadAttention`, torchvision's Swin window attention) by its projections'
weight fraction and its attention part by the kept share of heads. A run capture's
nodes carry the counts of the run that recorded them (`fxslim.graph.run_capture.FLOPS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import fx

from fxslim._inputs import as_inputs
from fxslim.graph.coupling import CouplingGraph, iter_spaces
from fxslim.graph.run_capture import FLOPS, RUN_MODEL
from fxslim.runtime.measure import FlopCounter, no_mha_fastpath

__all__ = ["CostModel"]

class CostModel:
    """Per-node MACs and per-parameter sizes of a traced module, to price plans quickly.

    Args:
        gm: the analysed GraphModule.
        cg: its coupling graph.
        example_inputs: inputs for the one measuring forward (batch 1 is enough).
    """

    def __init__(self, gm: fx.GraphModule, cg: CouplingGraph, example_inputs: Any):
        self.gm, self.cg = gm, cg
        self.node_macs: dict[str, tuple[float, float]] = {}  # name -> (projection, attention) MACs
        tree = gm.meta.get(RUN_MODEL, gm)  # a run capture's graph holds the parameters its run read
        self.param_shapes = {k: tuple(p.shape) for k, p in tree.named_parameters()}
        self._measure(as_inputs(example_inputs).flat(gm))
        self.total_macs = sum(a + b for a, b in self.node_macs.values())
        self.total_params = sum(int(np.prod(s)) for s in self.param_shapes.values())

    def _measure(self, xs: tuple) -> None:
        macs = self.node_macs
        attention = self.cg.builder.attention

        def note(n: fx.Node, counts: Mapping[Any, int]) -> None:
            total = sum(counts.values()) / 2
            if total:
                if n.name in attention:  # projections (mm) apart from the attention (bmm)
                    proj = sum(v for k, v in counts.items() if "mm" in str(k) and "bmm" not in str(k)) / 2
                    macs[n.name] = (proj, total - proj)
                else:
                    macs[n.name] = (total, 0.0)

        if self.gm.meta.get("fxslim_capture", {}).get("kind") == "run":  # counted while it was recorded
            for n in self.gm.graph.nodes:
                note(n, n.meta.get(FLOPS, {}))
            return

        class Count(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                if n.op not in ("call_module", "call_function", "call_method"):
                    return super().run_node(n)
                with FlopCounter() as fc:
                    out = super().run_node(n)
                note(n, fc.get_flop_counts().get("Global", {}))
                return out

        with torch.inference_mode(), no_mha_fastpath():
            Count(self.gm).run(*xs)

    def _kept_fraction(self, keep: Mapping[tuple[str, int], np.ndarray], target: str) -> float:
        shape = self.param_shapes.get(target)
        if shape is None:
            return 1.0
        f = 1.0
        for d, n in enumerate(shape):
            k = keep.get((target, d))
            if k is not None:
                f *= len(k) / n
        return f

    def params(self, keep: Mapping[tuple[str, int], np.ndarray]) -> int:
        """Parameter count after a plan's `keep` map (exact)."""
        return round(sum(
            int(np.prod(s)) * self._kept_fraction(keep, t) for t, s in self.param_shapes.items()
        ))

    def macs(self, keep: Mapping[tuple[str, int], np.ndarray], class_removed: Mapping[int, np.ndarray]) -> float:
        """MACs after a plan (see the module docstring for the scaling rules)."""
        cg, b = self.cg, self.cg.builder
        nodes = {n.name: n for n in self.gm.graph.nodes}

        def ratio(space: int) -> float:
            c = int(cg.class_of[space])
            mask = class_removed.get(c)
            return 1.0 if mask is None else 1.0 - mask.mean()

        total = 0.0
        for name, (proj, attn) in self.node_macs.items():
            node = nodes[name]
            weight = b.weights.get(name)  # conv / linear, module or function form
            if weight is not None:
                total += proj * self._kept_fraction(keep, weight)
            elif name in b.attention:  # MultiheadAttention, Swin's window attention
                weight, heads = b.attention[name]
                total += proj * self._kept_fraction(keep, weight) + attn * ratio(heads)
            else:  # matmul-like: every distinct index set it touches scales it once
                classes = {}
                for s in list(iter_spaces(b.out.get(node))) + [
                    s for a in node.all_input_nodes for s in iter_spaces(b.out.get(a))
                ]:
                    classes.setdefault(int(cg.class_of[s]), s)
                f = 1.0
                for s in classes.values():
                    f *= ratio(s)
                total += proj * f
        return total
