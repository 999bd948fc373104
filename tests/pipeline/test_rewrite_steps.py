"""The fold and lowrank steps in a pipeline config: each saves a model whose plan records
the rewrite; the saves load back, and the folded one computes what the pruned one did."""

from __future__ import annotations

import json

import torch

import fxslim
from tests.pipeline.models import tiny_digits
from tests.pipeline.runs import ARCH, run

CONFIG = f"""\
name: rewrites
model: {ARCH}
inputs: [1, 1, 8, 8]
seed: 0
steps:
  - prune: {{ratio: 0.5, ignore: [fc]}}
  - fold
  - lowrank: {{rank_ratio: 0.5, layers: [fc]}}
"""


def test_fold_and_lowrank_steps(tmp_path):
    cfg = tmp_path / "rewrites.yaml"
    cfg.write_text(CONFIG)
    status = run(cfg, tmp_path / "run")
    assert set(status.values()) == {"ran"}, status
    steps = tmp_path / "run" / "steps"
    fold_plan = json.loads((steps / "02-fold" / "model" / "plan.json").read_text())
    low_plan = json.loads((steps / "03-lowrank" / "model" / "plan.json").read_text())
    assert [s.get("pass", "prune") for s in low_plan["steps"]] == [
        "prune",
        "fold_batchnorm",
        "lowrank",
    ]
    assert low_plan["steps"][-1]["ranks"] == {"fc": 4}  # fc: 10 x 8 after the prune, half of rank 8
    assert fold_plan["form"] == "graph"
    low = fxslim.load(steps / "03-lowrank" / "model", model=tiny_digits())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in low.modules())
    assert isinstance(low.get_submodule("fc"), torch.nn.Sequential)
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        folded = fxslim.load(steps / "02-fold" / "model", model=tiny_digits())
        pruned = fxslim.load(steps / "01-prune" / "model", model=tiny_digits())
        torch.testing.assert_close(folded(x), pruned(x), rtol=1e-4, atol=1e-5)
