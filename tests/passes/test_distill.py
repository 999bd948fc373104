"""Distillation: the loss against hand-computed values, channel-aligned features, teacher
mixing, real training runs on the bundled digits, the learning-rate choice, the cut-short
warning and the device the run uses. Tests that mean the CPU say device="cpu"."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import fxslim
from fxslim.passes import distill as distill_module
from fxslim.passes.distill import (
    FeatureDistiller,
    channel_map,
    distill,
    kd_loss,
    mix_teachers,
    prune_and_distill,
    thin_copy,
)
from fxslim.runtime import _lr
from fxslim.runtime.examples import DigitsResNet, accuracy, digits_loaders, fit
from fxslim.runtime.train import TrainResult


def test_kd_loss_hand_computed():
    T, alpha = 2.0, 0.75
    s = torch.tensor([[2.0, 0.0]])
    t_probs = torch.softmax(torch.tensor([[0.0, 2.0]]) / T, dim=1)  # [1/(1+e), e/(1+e)]
    e = math.e
    q = [1 / (1 + e), e / (1 + e)]  # teacher soft targets
    ps = [e / (1 + e), 1 / (1 + e)]  # softmax(s / T) = softmax([1, 0])
    kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, ps))
    ce = -math.log(math.exp(2) / (math.exp(2) + 1))
    want = (1 - alpha) * ce + alpha * T * T * kl
    assert kd_loss(s, t_probs, torch.tensor([0]), alpha, T).item() == pytest.approx(want, rel=1e-6)
    assert kd_loss(s, t_probs, None, alpha, T).item() == pytest.approx(T * T * kl, rel=1e-6)


def test_teacher_mixing_is_a_weighted_mean_of_soft_targets():
    a, b = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    mixed = mix_teachers([a, b], [3.0, 1.0], T=1.0)
    want = 0.75 * torch.softmax(a, 1) + 0.25 * torch.softmax(b, 1)
    assert torch.allclose(mixed, want) and mixed.sum().item() == pytest.approx(1.0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


def test_feature_alignment_uses_the_plan():
    torch.manual_seed(0)
    teacher = Net().eval()
    x = torch.randn(3, 1, 8, 8)
    student = fxslim.prune_channels(teacher, x, {"a": [1, 3]})
    student = fxslim.prune_channels(student, x, {"a": [0]})  # a second step composes
    assert channel_map(student, "a").tolist() == [2, 4, 5]
    assert channel_map(student, "b") is None
    fd = FeatureDistiller(student, teacher, ["a"])  # b's inputs lost channels: it differs
    with torch.no_grad():
        teacher(x)
        student(x)
    assert fd.loss().item() == pytest.approx(0.0, abs=1e-12)  # channel i of a is teacher's keep[i]
    with torch.no_grad():
        student.a.weight[0] += 1.0
        student(x)
    assert fd.loss().item() > 1e-3
    fd.remove()


def test_projection_for_another_architecture():
    teacher, student = Net().eval(), nn.Sequential(nn.Conv2d(1, 3, 3, padding=1))
    fd = FeatureDistiller(student, teacher, ["a"], student_layers=["0"], project=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        teacher(x)
    student(x)
    loss = fd.loss()
    loss.backward()
    assert fd.proj["0"].weight.shape == (6, 3, 1, 1) and fd.proj["0"].weight.grad is not None


@pytest.fixture(scope="module")
def digits_teacher():
    torch.manual_seed(0)
    train, val = digits_loaders(seed=0)
    teacher = fit(DigitsResNet(width=32), train, epochs=4, lr=3e-3, seed=0, device="cpu")
    return teacher, train, val


def test_distill_recovers_pruned_accuracy_with_and_without_labels(digits_teacher, tmp_path):
    teacher, train, val = digits_teacher
    x = torch.randn(1, 1, 8, 8)
    small = fxslim.prune(teacher, x, 0.6, ignore=["fc"])
    before = accuracy(small, val)
    seen = []
    res = distill(small, teacher, train, val, epochs=3, lr=2e-3, features=["block1.0"], progress=False,
                  callbacks=[lambda e, m, s: seen.append(m)], checkpoint_dir=tmp_path, seed=0, device="cpu")
    assert len(res.history) == 3 and len(seen) == 3 and (tmp_path / "best.pt").exists()
    assert {"val_accuracy", "val_precision", "val_recall", "val_f1"} <= set(res.history[-1])
    after = accuracy(res.student, val)
    assert after >= max(before + 0.1, 0.85), (before, after)
    assert after == pytest.approx(max(h["val_accuracy"] for h in res.history))  # best restored

    unlabeled = [(xb,) for xb, _ in train]  # teacher targets only
    small2 = fxslim.prune(teacher, x, 0.6, ignore=["fc"])
    res2 = distill(small2, teacher, unlabeled, val, epochs=3, lr=2e-3, progress=False, device="cpu")
    assert accuracy(res2.student, val) >= 0.8


def test_thin_copy_and_prune_and_distill(digits_teacher):
    teacher, train, val = digits_teacher
    x = torch.randn(1, 1, 8, 8)
    thin = thin_copy(teacher, x, 0.5, ignore=["fc"])
    assert thin.get_submodule("stem.0").out_channels == 16
    assert not torch.equal(thin.get_submodule("stem.0").weight, teacher.stem[0].weight[:16])  # re-initialised
    res = distill(thin, teacher, train, val, epochs=2, lr=3e-3, progress=False, device="cpu")
    assert accuracy(res.student, val) > 0.5
    base = fxslim.count_macs(teacher, x)
    student = prune_and_distill(teacher, x, train, val, target_macs=0.5, steps=2, epochs_per_step=1,
                                prune_kwargs={"ignore": ["fc"]}, progress=False, lr=2e-3, device="cpu")
    assert abs(fxslim.count_macs(student, x) / base - 0.5) <= 0.01
    assert accuracy(student, val) >= 0.85


def test_best_epoch_ties_in_accuracy_go_to_the_lower_validation_loss():
    # two well-separated clusters: every epoch is 100% accurate, the loss keeps falling
    torch.manual_seed(0)
    x = torch.cat([torch.randn(64, 2) + 4, torch.randn(64, 2) - 4])
    y = torch.cat([torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long)])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
        student.weight.copy_(torch.tensor([[0.1, 0.1], [-0.1, -0.1]]))
        teacher.bias.zero_()
        student.bias.zero_()
    res = distill(student, teacher, data, data, epochs=4, lr=0.05, alpha=0.0, progress=False, device="cpu")
    accs = [h["val_accuracy"] for h in res.history]
    losses = [h["val_loss"] for h in res.history]
    assert accs == [1.0] * 4 and losses[-1] < losses[0]
    assert res.best_epoch == min(range(4), key=losses.__getitem__) != 0


def test_mixed_precision_path_trains_on_cpu(digits_teacher):
    """The autocast + GradScaler path (the CUDA default) on CPU's bfloat16 autocast: the
    loss, feature loss, unscale-then-clip and the scaler step run; the student stays float32."""
    teacher, train, val = digits_teacher
    x = torch.randn(1, 1, 8, 8)
    small = fxslim.prune(teacher, x, 0.6, ignore=["fc"])
    before = accuracy(small, val)
    seen = set()
    conv = next(m for m in small.modules() if isinstance(m, nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)
    res = distill(small, teacher, train, val, epochs=2, lr=2e-3, features=["block1.0"], device="cpu", amp=True,
                  progress=False, seed=0)
    hook.remove()
    assert seen == {torch.bfloat16}  # training ran under autocast
    assert all(p.dtype == torch.float32 for p in res.student.parameters())
    assert all(math.isfinite(h["train_loss"]) for h in res.history)
    assert accuracy(res.student, val) >= max(before + 0.1, 0.8)


def test_auto_lr_is_recorded_and_the_run_is_the_one_with_the_chosen_lr(digits_teacher):
    teacher, _, _ = digits_teacher
    x = torch.randn(1, 1, 8, 8)
    runs = []
    for lr in ("auto", None):
        train, val = digits_loaders(seed=0)  # fresh: the loader shuffles from its own generator
        small = fxslim.prune(teacher, x, 0.6, ignore=["fc"])
        runs.append(distill(small, teacher, train, val, epochs=2, lr=lr or runs[0].lr, progress=False, seed=1,
                            device="cpu"))
    auto, fixed = runs
    assert auto.lr in _lr.LR_CANDIDATES and set(auto.lr_scores) == set(_lr.LR_CANDIDATES)
    assert auto.lr == max(_lr.LR_CANDIDATES, key=lambda c: (auto.lr_scores[c][0], -auto.lr_scores[c][1]))
    assert fixed.lr_scores == {} and auto.history == fixed.history  # the trials left no trace on the run
    for a, b in zip(auto.student.state_dict().values(), fixed.student.state_dict().values()):
        assert torch.equal(a, b)


def test_cut_short_warning_fires_on_a_short_run_and_not_on_a_converged_one(digits_teacher, caplog):
    teacher, _, _ = digits_teacher
    x = torch.randn(1, 1, 8, 8)
    train, val = digits_loaders(seed=0)  # fresh: what the runs see must not depend on earlier tests
    with caplog.at_level(logging.WARNING, logger="fxslim.runtime.train"):
        short = distill(fxslim.prune(teacher, x, 0.6, ignore=["fc"]), teacher, train, val, epochs=2, lr=3e-4,
                        progress=False, device="cpu")
    assert len(short.warnings) == 1 and "cut short" in short.warnings[0]
    assert "epochs=4" in short.warnings[0] and "higher lr than 0.0003" in short.warnings[0]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == short.warnings
    caplog.clear()
    train, val = digits_loaders(seed=0)
    with caplog.at_level(logging.WARNING, logger="fxslim.runtime.train"):
        done = distill(fxslim.prune(teacher, x, 0.6, ignore=["fc"]), teacher, train, val, epochs=8, lr=3e-3,
                       progress=False, device="cpu")
    assert done.warnings == [] and not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert accuracy(done.student, val) > accuracy(short.student, val)  # the short run was short


def test_default_device_is_the_students_even_where_cuda_exists(monkeypatch):
    """distill used to default to CUDA whenever it existed and hand the student back there.
    CUDA is faked as present; the loop is stubbed (torch's optimizers would look for CUDA)."""
    seen = {}

    def fake_train(model, objective, *args, **kwargs):
        seen["device"] = kwargs["device"]
        return TrainResult(model, lr=1e-3)

    monkeypatch.setattr(distill_module, "train", fake_train)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    data = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))]
    distill(student, teacher, data, data, epochs=1, progress=False)
    assert seen["device"] == torch.device("cpu") and teacher.weight.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_student_trains_there_and_example_helpers_follow_it(digits_teacher):
    teacher, train, val = digits_teacher
    small = fxslim.prune(teacher, torch.randn(1, 1, 8, 8), 0.6, ignore=["fc"]).cuda()
    res = distill(small, teacher, train, val, epochs=2, lr=3e-3, progress=False)
    assert next(res.student.parameters()).is_cuda
    assert accuracy(res.student, val) > 0.8  # CPU batches, CUDA model
