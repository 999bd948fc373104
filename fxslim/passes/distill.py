"""Distillation: recover a pruned (or any smaller) student's accuracy from its teacher(s).

Logit loss, with temperature T and mix alpha, for student logits s, teacher logits t and
labels y::

    L = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

(the T^2 keeps the soft term's gradient scale independent of T). Without labels the CE
term is dropped (alpha = 1). Several teachers: the soft target is the weighted mean of
their softmax(t_k / T), weights summing to one.

Feature loss: mean squared error between chosen intermediate features. When the student
was produced by fxslim from the teacher, student channel i *is* teacher channel
``keep[i]`` (``fxslim.utils.fxslim_meta(student)["fxslim_keep"]``: ``gm.meta`` of a
GraphModule, ``student.fxslim_meta`` of a model in its own classes), so the teacher feature is simply indexed,
with no learned adapter; for another architecture a learned 1x1 projection maps student
channels to teacher channels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxslim._args import check_module, module_paths, number
from fxslim.errors import ArgumentError, FxslimError
from fxslim.runtime.train import (
    Bound,
    Objective,
    check_training_args,
    evaluate,
    model_device,
    train,
)
from fxslim.utils import fxslim_meta

__all__ = [
    "DistillResult",
    "FeatureDistiller",
    "channel_map",
    "distill",
    "evaluate",
    "kd_loss",
    "mix_teachers",
    "prune_and_distill",
    "reinitialise",
    "thin_copy",
]

logger = logging.getLogger(__name__)


def kd_loss(student: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor | None,
            alpha: float = 0.9, T: float = 4.0) -> torch.Tensor:
    """(1 - alpha) CE(student, labels) + alpha T^2 KL(teacher_probs || softmax(student / T)).

    Args:
        student: student logits (N, C).
        teacher_probs: the teacher's softened probabilities softmax(t / T), (N, C).
        labels: class indices, or None (teacher targets only).
    """
    soft = F.kl_div(F.log_softmax(student / T, dim=1), teacher_probs, reduction="batchmean") * T * T
    if labels is None:
        return soft
    return (1 - alpha) * F.cross_entropy(student, labels) + alpha * soft


def mix_teachers(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None, T: float = 4.0) -> torch.Tensor:
    """Weighted mean of softmax(t_k / T) over teachers (weights normalised to sum to one)."""
    w = torch.tensor(weights if weights is not None else [1.0] * len(logits), dtype=logits[0].dtype)
    w = w / w.sum()
    return sum(wk * F.softmax(t / T, dim=1) for wk, t in zip(w, logits))


def channel_map(student: nn.Module, layer: str) -> torch.Tensor | None:
    """Teacher channel of each output channel of `layer` in an fxslim-pruned student.

    Returns None when the layer was not pruned (channel i is channel i).
    """
    keep = fxslim_meta(student).get("fxslim_keep", {})
    mod = student.get_submodule(layer)
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding)):
        key = f"{layer}.weight:1"  # these keep their output channels on weight dim 1
    elif isinstance(mod, nn.MultiheadAttention):
        key = f"{layer}.out_proj.weight:0"
    else:
        key = f"{layer}.weight:0"
    return torch.as_tensor(keep[key]) if key in keep else None


class _Tap:
    """Records a module's output on every forward."""

    def __init__(self, module: nn.Module):
        self.out: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, mod: nn.Module, args: Any, out: Any) -> None:
        self.out = out

    def remove(self) -> None:
        self.handle.remove()


class FeatureDistiller(nn.Module):
    """MSE between student and teacher features at named layers (channel dim 1).

    Args:
        student, teacher: the two models (hooks are added to the named layers).
        layers: layer paths present in both (e.g. ["layer1.0.conv1"]).
        student_layers: the student's paths when they differ (another architecture).
        project: learn a 1x1 projection per layer instead of channel alignment (needed
            when the student is not an fxslim-pruned copy of the teacher).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: Sequence[str],
                 student_layers: Sequence[str] | None = None, project: bool = False):
        super().__init__()
        self.layers = list(layers)
        s_layers = list(student_layers or layers)
        self.s_taps = [_Tap(student.get_submodule(p)) for p in s_layers]
        self.t_taps = [_Tap(teacher.get_submodule(p)) for p in self.layers]
        self.maps = [None if project else channel_map(student, p) for p in s_layers]
        self.project = project
        self.proj = nn.ModuleDict()

    def loss(self) -> torch.Tensor:
        total = torch.zeros(())
        for i, (s, t) in enumerate(zip(self.s_taps, self.t_taps)):
            fs, ft = s.out, t.out.detach()
            if self.project:
                key = str(i)
                if key not in self.proj:
                    conv = nn.Conv2d if fs.dim() == 4 else nn.Conv1d
                    self.proj[key] = conv(fs.shape[1], ft.shape[1], 1, bias=False).to(fs.device)
                fs = self.proj[key](fs)
            elif self.maps[i] is not None:
                ft = ft.index_select(1, self.maps[i].to(ft.device))
            if fs.shape != ft.shape:
                raise FxslimError(
                    f"feature shapes differ at '{self.layers[i]}': student {tuple(fs.shape)}, "
                    f"teacher {tuple(ft.shape)}; use project=True for another architecture"
                )
            total = total + F.mse_loss(fs, ft)
        return total / max(len(self.s_taps), 1)

    def remove(self) -> None:
        for tap in self.s_taps + self.t_taps:
            tap.remove()


@dataclass
class DistillResult:
    """What `distill` returns: the student (best epoch restored), the per-epoch history, the
    learning rate used and, when it was chosen, each candidate's trial score (validation
    accuracy, loss), and warnings (e.g. that the run was cut short)."""

    student: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    lr: float = float("nan")
    lr_scores: dict[float, tuple[float, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _kd_objective(teachers: list[nn.Module], alpha: float, temperature: float,
                  teacher_weights: Sequence[float] | None, features: Sequence[str] | None, feature_weight: float,
                  student_features: Sequence[str] | None, project_features: bool,
                  regularizer: Callable[[nn.Module], torch.Tensor] | None, reg_weight: float) -> Objective:
    """The distillation loss of the module doc, bound to a student (the run's, or a trial copy)."""

    def bind(student: nn.Module) -> Bound:
        feat = None
        if features:
            feat = FeatureDistiller(student, teachers[0], features, student_features, project_features)

        def loss(forward, x, y):
            with torch.no_grad():
                t_logits = [t(x) for t in teachers]
            out = forward(x)
            probs = mix_teachers([tl.float() for tl in t_logits], teacher_weights, temperature)
            total = kd_loss(out.float(), probs, y, alpha, temperature)
            if feat is not None:
                total = total + feature_weight * feat.loss()
            if regularizer is not None and reg_weight:
                total = total + reg_weight * regularizer(student)
            return total, out

        params = list(feat.parameters()) if feat is not None and project_features else []
        return Bound(loss, params, feat.remove if feat is not None else (lambda: None))

    return bind


def _check_kd_args(student: Any, teachers: list, alpha: Any, temperature: Any, teacher_weights: Any,
                   features: Any, student_features: Any, project_features: bool, feature_weight: Any) -> None:
    check_module("student", student)
    if not teachers:
        raise ArgumentError("teacher: give a model or a non-empty sequence of models")
    for i, t in enumerate(teachers):
        check_module(f"teacher[{i}]" if len(teachers) > 1 else "teacher", t)
    number("alpha", alpha, 0.0, 1.0)
    number("temperature", temperature, 0.0, lo_open=True)
    number("feature_weight", feature_weight, 0.0)
    if teacher_weights is not None:
        if isinstance(teacher_weights, (str, bytes)) or not isinstance(teacher_weights, Sequence) \
                or len(teacher_weights) != len(teachers):
            raise ArgumentError(f"teacher_weights must be one number per teacher ({len(teachers)}), "
                                f"got {teacher_weights!r}")
        for i, w in enumerate(teacher_weights):
            number(f"teacher_weights[{i}]", w, 0.0)
    if features:
        t_paths = module_paths(teachers[0], features, "features (teacher layers)")
        s_paths = module_paths(student, features if student_features is None else student_features,
                               "features (student layers)" if student_features is None else "student_features")
        if len(s_paths) != len(t_paths):
            raise ArgumentError("student_features must name one student layer per teacher feature layer")


def distill(
    student: nn.Module,
    teacher: nn.Module | Sequence[nn.Module],
    train_data: Iterable,
    val_data: Iterable | None = None,
    *,
    epochs: int = 5,
    lr: float | str | Sequence[float] = "auto",
    weight_decay: float = 1e-4,
    alpha: float = 0.9,
    temperature: float = 4.0,
    teacher_weights: Sequence[float] | None = None,
    features: Sequence[str] | None = None,
    feature_weight: float = 1.0,
    student_features: Sequence[str] | None = None,
    project_features: bool = False,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    reg_weight: float = 0.0,
    clip_grad: float | None = 5.0,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    seed: int = 0,
    callbacks: Sequence[Callable[[int, dict[str, float], nn.Module], None]] = (),
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> DistillResult:
    """Train `student` against `teacher` (or several), labels optional.

    AdamW under a short warm-up (at most 5% of the steps) and a cosine decay to zero; the
    best validation epoch is restored (ties in accuracy to the lower validation loss).

    Args:
        student: the model to train (trained in place; the best epoch is restored).
        teacher: one model or a sequence (their soft targets are mixed by `teacher_weights`).
        train_data / val_data: iterables of (inputs, labels) or of inputs alone.
        lr: "auto" (default) tries 3e-4, 1e-3, 3e-3 and 1e-2: each trains a copy of the
            student for about one epoch (16 to 32 steps, the same batches for each) with
            this very loss and a compressed schedule, scored on up to 8 validation batches
            (on held-out training batches without `val_data`); the best is used and
            recorded in `result.lr` and `result.lr_scores`. Bounded cost: at most 4 x 32
            extra steps whatever the epochs (about one epoch per candidate on small data).
            A number uses that lr; a sequence chooses among its values.
        alpha, temperature: the logit loss's mix and temperature (see the module doc).
        features: layer paths for feature distillation (channel-aligned for fxslim
            students; `project_features=True` for other architectures).
        regularizer: e.g. ``GroupLasso(...)`` or ``bn_scale_penalty``, times `reg_weight`.
        clip_grad: max gradient norm (None disables).
        device: where to train (default: the student's device, i.e. its first parameter's;
            the teachers are moved there). `amp`: mixed precision (default: on for CUDA).
        seed: seeds torch for the run (the lr trials included): the same seed, the same result.
        callbacks: ``cb(epoch, metrics, student)`` after each epoch (rank 0 only).
        checkpoint_dir: rank 0 writes ``best.pt`` (state dict) here.

    Under ``torchrun`` (torch.distributed initialised) the student is wrapped in
    DistributedDataParallel, the training data gets a DistributedSampler, and only rank
    0 logs, calls callbacks and writes files.

    Returns:
        A `DistillResult` with per-epoch metrics. When the last epoch was the best and
        validation accuracy was still rising by more than one standard error, the run
        was probably cut short: `result.warnings` says so (also logged) and names the knob
        (more epochs, or a higher lr).

    Example:
        >>> res = fxslim.distill(small, model, train, val, epochs=3, features=["layer1.0.conv1"])
        >>> res.lr, res.warnings
    """
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    _check_kd_args(student, teachers, alpha, temperature, teacher_weights, features, student_features,
                   project_features, feature_weight)
    check_training_args(student, train_data, val_data, epochs, lr, weight_decay, clip_grad, device, checkpoint_dir)
    torch.manual_seed(seed)
    dev = torch.device(device) if device is not None else model_device(student)
    saved = [(t, t.training, [(p, p.requires_grad) for p in t.parameters()]) for t in teachers]
    for t in teachers:
        t.to(dev).eval()
        for p in t.parameters():
            p.requires_grad_(False)
    objective = _kd_objective(teachers, alpha, temperature, teacher_weights, features, feature_weight,
                              student_features, project_features, regularizer, reg_weight)
    try:
        res = train(student, objective, train_data, val_data, epochs=epochs, lr=lr, weight_decay=weight_decay,
                    clip_grad=clip_grad, device=dev, amp=amp, seed=seed, callbacks=callbacks, progress=progress,
                    checkpoint_dir=checkpoint_dir)
    finally:  # the teachers are the user's models: give them back as they were
        for t, mode, flags in saved:
            t.train(mode)
            for p, flag in flags:
                p.requires_grad_(flag)
    return DistillResult(student, res.history, res.best_epoch, res.lr, res.lr_scores, res.warnings)


def thin_copy(teacher: nn.Module, example_inputs: Any, ratio: float = 0.5, **prune_kwargs: Any) -> nn.Module:
    """fxslim's uniformly thinned copy of `teacher`, freshly initialised: a from-scratch
    student with the teacher's architecture at (1 - ratio) of its widths."""
    from fxslim.passes.policy import prune

    student = prune(teacher, example_inputs, ratio, importance="random", **prune_kwargs)
    return reinitialise(student, prune_kwargs.get("seed", 0))


def reinitialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` with every submodule's parameters (and norm statistics) drawn afresh, in
    place and seeded: the same architecture as a from-scratch student."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model


def prune_and_distill(
    teacher: nn.Module,
    example_inputs: Any,
    train_data: Iterable,
    val_data: Iterable | None = None,
    *,
    target_macs: float,
    steps: int = 2,
    epochs_per_step: int = 2,
    prune_kwargs: Mapping[str, Any] | None = None,
    **distill_kwargs: Any,
) -> nn.Module:
    """Alternate pruning steps and distillation epochs (against the original teacher) to
    `target_macs` of the teacher's MACs; returns the final student."""
    from fxslim.passes.schedule import prune_iteratively

    def recover(model: nn.Module, step: int) -> nn.Module:
        return distill(model, teacher, train_data, val_data, epochs=epochs_per_step, **distill_kwargs).student

    return prune_iteratively(teacher, example_inputs, steps=steps, target_macs=target_macs, callback=recover,
                             **dict(prune_kwargs or {}))
