"""The shared training loop: schedule values, the learning-rate choice (a real choice, and
one that leaves the run as if the chosen lr had been given), the cut-short warning, the
device it runs on, and collectives on the training device."""

from __future__ import annotations

import itertools
import logging
import math
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fxslim.errors import FxslimError
from fxslim.runtime import _lr
from fxslim.runtime.examples import digits_loaders, fit
from fxslim.runtime.train import _mean_over_ranks, labels_only, model_device, train


def test_schedule_warms_up_briefly_then_decays_to_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _lr.schedule(opt, 200)  # warm-up: min(200 // 20, 50) = 10 steps from lr / 10
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 + 0.9 / 10)
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[105] == pytest.approx(0.5, abs=1e-9)  # cosine midpoint: (105 - 10) / 190
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 189 / 190)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    short = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    _lr.schedule(short, 19)  # under 20 steps: no warm-up at all
    assert short.param_groups[0]["lr"] == pytest.approx(1.0)
    long = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _lr.schedule(long, 10_000)  # the warm-up is capped at 50 steps however long the run
    for _ in range(49):
        long.step()
        sched.step()
    assert long.param_groups[0]["lr"] == pytest.approx(1.0)


def test_lr_argument_forms_and_typed_errors():
    assert _lr.lr_candidates("auto") == _lr.LR_CANDIDATES
    assert _lr.lr_candidates(3e-3) == (3e-3,)
    assert _lr.lr_candidates([1e-3, 1e-2]) == (1e-3, 1e-2)
    for bad in ("fast", -1.0, 0, math.nan, [], [1e-3, "x"], True):
        with pytest.raises(FxslimError, match="lr="):
            _lr.lr_candidates(bad)


def test_trial_steps_are_bounded():
    assert _lr.trial_steps(17) == 17
    assert _lr.trial_steps(3) == _lr.MIN_TRIAL_STEPS
    assert _lr.trial_steps(10_000) == _lr.trial_steps(None) == _lr.MAX_TRIAL_STEPS


def _history(accs):
    return [{"epoch": i, "val_accuracy": a, "val_loss": 1.0 - a} for i, a in enumerate(accs)]


def test_cut_short_warning_rule():
    # n = 400: one standard error at 95% is sqrt(0.95 * 0.05 / 400) = 0.0109
    msg = _lr.cut_short_warning(_history([0.80, 0.90, 0.95]), 400, 1e-3, False, False)
    assert "0.9000 -> 0.9500" in msg and "epochs=6" in msg and "higher lr than 0.001" in msg
    msg = _lr.cut_short_warning(_history([0.80, 0.90, 0.95]), 400, 1e-2, True, True)
    assert "the largest tried" in msg
    msg = _lr.cut_short_warning(_history([0.80, 0.90, 0.95]), 400, 3e-3, True, False)
    assert "epochs=6" in msg and "higher lr" not in msg  # the lr was chosen below the top: more epochs
    assert _lr.cut_short_warning(_history([0.95, 0.97, 0.975]), 400, 1e-3, False, False) is None  # < 1 s.e.
    assert _lr.cut_short_warning(_history([0.90, 0.97, 0.96]), 400, 1e-3, False, False) is None  # best earlier
    # near the ceiling one standard error is under one example: one more right is not "improving"
    assert _lr.cut_short_warning(_history([358 / 359, 359 / 359]), 359, 1e-3, False, False) is None
    assert _lr.cut_short_warning(_history([357 / 359, 359 / 359]), 359, 1e-3, False, False) is not None
    assert _lr.cut_short_warning(_history([0.5]), 400, 1e-3, False, False) is None
    assert _lr.cut_short_warning([{"epoch": 0}, {"epoch": 1}], 0, 1e-3, False, False) is None  # no validation


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    return digits_loaders(seed=0)


def test_lr_choice_prefers_the_rate_that_learns(digits):
    train_data, val = digits
    res = train(_mlp(), labels_only, train_data, val, epochs=1, lr=[1e-6, 1e-2], seed=0)
    assert set(res.lr_scores) == {1e-6, 1e-2}
    (slow_acc, slow_loss), (fast_acc, fast_loss) = res.lr_scores[1e-6], res.lr_scores[1e-2]
    assert fast_acc > slow_acc + 0.3 and fast_loss < slow_loss  # 16 steps at 1e-6 move nothing
    assert res.lr == 1e-2


def test_lr_choice_leaves_the_run_as_with_the_chosen_lr_and_is_deterministic():
    # fresh loaders for each run: they shuffle from their own generator, which the trials
    # must hand back as they found it
    auto = train(_mlp(), labels_only, *digits_loaders(seed=0), epochs=2, lr=[3e-3, 1e-2], seed=3)
    again = train(_mlp(), labels_only, *digits_loaders(seed=0), epochs=2, lr=[3e-3, 1e-2], seed=3)
    fixed = train(_mlp(), labels_only, *digits_loaders(seed=0), epochs=2, lr=auto.lr, seed=3)
    assert auto.history == again.history == fixed.history and auto.lr_scores == again.lr_scores
    for a, b, c in zip(auto.model.state_dict().values(), again.model.state_dict().values(),
                       fixed.model.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert fixed.lr_scores == {}  # nothing was tried


def test_lr_choice_without_validation_scores_held_out_training_batches(digits):
    train_data, _ = digits
    res = train(_mlp(), labels_only, train_data, None, epochs=1, lr=[1e-6, 1e-2], seed=0)
    assert res.lr == 1e-2 and res.lr_scores[1e-2][0] > res.lr_scores[1e-6][0] + 0.3
    assert res.warnings == []  # without validation there is no cut-short check


def test_fit_warns_when_cut_short_and_not_when_converged(caplog):
    # fresh loaders: what a run sees must not depend on the tests before it
    with caplog.at_level(logging.WARNING, logger="fxslim.runtime.train"):
        train_data, val = digits_loaders(seed=0)
        fit(_mlp(), train_data, epochs=2, lr=3e-3, val=val)  # from scratch: 76% -> 84% here
    assert any("cut short" in r.getMessage() and "epochs=4" in r.getMessage()
               and "higher lr than 0.003" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fxslim.runtime.train"):
        train_data, val = digits_loaders(seed=0)
        net = fit(_mlp(), train_data, epochs=20, lr=1e-2, val=val)  # flat at ~96.7% from epoch 5
    assert not any("cut short" in r.getMessage() for r in caplog.records)
    assert model_device(net) == torch.device("cpu")


def test_model_device_is_the_first_parameters():
    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert model_device(nn.BatchNorm1d(2, affine=False).to("meta")) == torch.device("meta")  # buffers only
    assert model_device(nn.ReLU()) == torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mean_over_ranks_reduces_on_the_training_device(monkeypatch):
    """nccl has no CPU tensors: the reduced tensor must live on the training device. A gloo
    world of size 1; a spy records the device of every all-reduced tensor."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        seen = []
        real = dist.all_reduce

        def spy(t, *args, **kwargs):
            seen.append(t.device)
            return real(t, *args, **kwargs) if t.device.type == "cpu" else None

        monkeypatch.setattr(dist, "all_reduce", spy)
        assert _mean_over_ranks(0.75, torch.device("cpu")) == 0.75  # reduced for real by gloo
        with pytest.raises(RuntimeError, match="meta"):  # a meta tensor holds no value to read back
            _mean_over_ranks(0.75, torch.device("meta"))
        assert seen == [torch.device("cpu"), torch.device("meta")]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_and_accuracy_run_on_the_models_cuda_device(digits):
    from fxslim.runtime.examples import accuracy

    train_data, val = digits
    net = fit(_mlp().cuda(), train_data, epochs=2, lr=1e-2, val=val)  # CPU batches, CUDA model
    assert model_device(net).type == "cuda" and accuracy(net, val) > 0.8
