"""Which torchvision classification models keep their class after prune(ratio=0.5).

One line of JSON per model: the form `fxslim.prune` returns (the model's own class or the
GraphModule fallback), the reason for a fallback, and the seconds the class-keeping
rewrite and its proof took, and which proof (the graph traced again from the kept copy
matches node for node, or both run on two inputs; `fxslim.passes._same_graph`). Usage::

    python -m bench.keep_classes_zoo out.jsonl [name-prefix ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import fx

import fxslim
from fxslim.passes._same_graph import graph_mismatch
from fxslim.passes.keep_classes import _Refused, keep_classes, rebuild_classes
from fxslim.passes.policy import uniform_removal
from fxslim.passes.prune import apply_plan, make_plan
from tests.zoo.zoo import ZOO, build, head_of


def main(out: str, prefixes: list[str]) -> None:
    torch.set_num_threads(1)
    done = set()
    try:
        with open(out) as f:
            done = {json.loads(line)["model"] for line in f}
    except FileNotFoundError:
        pass
    for name in ZOO:
        if name in done or (prefixes and not name.startswith(tuple(prefixes))):
            continue
        model, x = build(name)
        gm = fxslim.trace(model, x, share_weights=True)
        cg = fxslim.analyze(gm)
        small = apply_plan(gm, cg, make_plan(cg, uniform_removal(gm, cg, 0.5, [head_of(model)])), x, inplace=True)
        t = time.perf_counter()
        kept = keep_classes(model, small, x, {})
        secs = time.perf_counter() - t
        try:
            proof = graph_mismatch(rebuild_classes(model, small), small, {}) or "graph"
        except _Refused:
            proof = "-"
        line = {"model": name, "kept": not isinstance(kept, fx.GraphModule), "class": type(kept).__name__,
                "seconds": round(secs, 3), "reason": small.meta.get("fxslim_form_reason"),
                "proof": proof if proof in ("graph", "-") else f"run ({proof})"}
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(name, line["kept"], line["seconds"], line["proof"][:80], (line["reason"] or "")[:150], flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
