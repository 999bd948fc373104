"""pytest-benchmark: trace + analysis + prune(ratio=0.5), fxslim vs torch-pruning 1.6.

    python -m pytest bench/test_prune_speed.py --benchmark-group-by=param:name

CI runs it with --benchmark-disable (each case runs once) so it cannot rot; the table in
bench/README.md comes from `python bench/prune_speed.py` (side by side, one process).
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench.prune_speed import MODELS, RULED, build, run_fxslim, run_torch_pruning

pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module", params=list(RULED))
def case(request):
    torch.manual_seed(0)
    name = request.param
    return name, build(name), torch.randn(1, 3, 224, 224)


def test_fxslim(benchmark, case):
    name, model, x = case
    small = benchmark.pedantic(run_fxslim, args=(model, x, MODELS[name]), rounds=3, iterations=1)
    with torch.inference_mode():
        assert small(x).shape == model(x).shape


def test_torch_pruning(benchmark, case):
    name, model, x = case
    pruned = benchmark.pedantic(
        run_torch_pruning, setup=lambda: ((copy.deepcopy(model), x, MODELS[name]), {}), rounds=3, iterations=1
    )
    with torch.inference_mode():
        assert pruned(x).shape == model(x).shape
