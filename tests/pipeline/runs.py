"""The tests' digits pipeline config (DigitsResNet at width 8, a few epochs) and helpers."""

from __future__ import annotations

import json
from pathlib import Path

from fxslim import cli

ARCH = "tests.pipeline.models:tiny_digits"
DATA = "tests.pipeline.models:digits_data"
CONFIG = f"""\
name: tiny
model: {ARCH}
data: {DATA}
inputs: [1, 1, 8, 8]
seed: 3
steps:
  - finetune: {{epochs: 3, lr: 0.01}}
  - prune: {{ratio: 0.5, ignore: [fc]}}
  - distill: {{epochs: DISTILL_EPOCHS}}
  - export: {{simplify: false, baseline: BASELINE}}
  - benchmark: {{batch_sizes: BATCH_SIZES, runs: 3, warmup: 1}}
  - report
"""
NAMES = ["00-source", "01-finetune", "02-prune", "03-distill", "04-export", "05-benchmark", "06-report"]


def config(tmp: Path, epochs: int = 1, batch_sizes: str = "[1, 4]", baseline: bool = True) -> Path:
    path = tmp / f"tiny-{epochs}-{len(batch_sizes)}-{baseline}.yaml"
    path.write_text(CONFIG.replace("DISTILL_EPOCHS", str(epochs)).replace("BATCH_SIZES", batch_sizes)
                    .replace("BASELINE", str(baseline).lower()))
    return path


def status(run_dir: Path) -> dict[str, str]:
    return {s["name"]: s["status"] for s in json.loads((run_dir / "manifest.json").read_text())["steps"]}


def run(config_path: Path, out: Path) -> dict[str, str]:
    assert cli.main(["run", str(config_path), "--out", str(out), "--quiet"]) == 0
    return status(out)


def record(folder: Path) -> dict:
    return json.loads((folder / "step.json").read_text())
