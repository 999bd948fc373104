"""Hugging Face models through the torch.export capture: groups by kind, pins, what
`fxslim.prune(..., ratio=0.5)` keeps, capture time. Writes bench/HF.md.

    python -m bench.hf_table
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import torch

import fxslim
from fxslim.runtime.measure import count_macs
from tests.hf.models import NAMES, build

OUT = Path(__file__).with_name("HF.md")
_HEADS = re.compile(r"(query|q_proj|q_lin|c_attn)\.weight$")
_MLP = re.compile(r"(intermediate\.dense|fc1|gate_proj|lin1|c_fc)\.weight$")


def kind(g) -> str:
    """heads / mlp / hidden / other, by the group's members."""
    targets = [m.target for m in g.members if m.kind == "param"]
    if g.stat and any("emb" in t or "wte" in t or "patch" in t for t in targets):
        return "hidden"
    if any(_HEADS.search(t) for t in targets):
        return "heads"
    if any(_MLP.search(t) for t in targets):
        return "mlp"
    return "other"


def main() -> None:
    torch.set_num_threads(2)
    fxslim.trace(*build("bert"))  # warm-up: torch.export's first call pays for its imports
    rows = [("| model | attn | capture s | heads groups (units) | MLP groups (units) | hidden (units) | other prunable "
            "| pinned: reasons | params kept | MACs kept |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name in NAMES:
        for attn in ("eager", "sdpa"):
            model, x = build(name, attn)
            t = time.perf_counter()
            gm = fxslim.trace(model, x, share_weights=True)
            took = time.perf_counter() - t
            cg = fxslim.analyze(gm)
            by = {k: [g for g in cg.groups if g.prunable and kind(g) == k] for k in ("heads", "mlp", "hidden", "other")}
            pins = Counter(re.sub(r" \(node [^)]*\)", "", g.reason) for g in cg.groups if not g.prunable)
            small = fxslim.prune(gm, x, ratio=0.5)
            p0, p1 = (sum(p.numel() for p in m.parameters()) for m in (model, small))
            m0, m1 = count_macs(model, x), count_macs(small, x)

            def cell(gs):
                return f"{len(gs)} ({', '.join(str(g.size) for g in gs[:2])}{', ...' if len(gs) > 2 else ''})"
            rows.append(f"| {name} | {attn} | {took:.2f} | {cell(by['heads'])} | {cell(by['mlp'])} | "
                        f"{cell(by['hidden'])} | {len(by['other'])} | "
                        f"{'; '.join(f'{r} ({n})' for r, n in pins.items())} | {p1 / p0:.2f} | {m1 / m0:.2f} |")
            print(rows[-1], flush=True)
    text = ("# Hugging Face models (torch.export capture)\n\nTiny configs, random weights (tests/hf/models.py); "
            "prune(ratio=0.5), L1 importance, every prunable group. Hidden-size groups pass RMSNorm/LayerNorm "
            "statistics: proven by slicing consistency and shapes, heads and MLP by the dead-channel oracle "
            "(tests/hf/test_hf.py).\n\n" + "\n".join(rows) + "\n")
    OUT.write_text(text)


if __name__ == "__main__":
    main()
