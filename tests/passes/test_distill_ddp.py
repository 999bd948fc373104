"""A real two-process torchrun (gloo, CPU): both ranks end with identical weights and
only rank 0 writes files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_torchrun_two_ranks_identical_weights_rank0_writes(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(worker), str(tmp_path / "out")],
        check=False, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = dict(re.findall(r"RANK (\d) WORLD 2 WEIGHTS ([0-9a-f]{64})", proc.stdout))
    assert set(found) == {"0", "1"}, proc.stdout
    assert found["0"] == found["1"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["best.pt"]
