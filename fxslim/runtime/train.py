"""One training loop for `fxslim.distill` and `examples.fit`: what is minimised (an
`Objective`) is the only difference between them, so the learning-rate choice, the
schedule, the best-epoch restore and the cut-short warning are the same for every method
(see `fxslim.runtime._lr` for the schedule and the choice).

Runs on the model's device unless told otherwise; under ``torchrun`` (torch.distributed
initialised) the model is wrapped in DistributedDataParallel, the training data gets a
DistributedSampler, every collective runs on the training device (nccl has no CPU
tensors), and only rank 0 logs, calls callbacks and writes files.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxslim._args import check_module, number, positive_int
from fxslim.errors import ArgumentError, FxslimError
from fxslim.runtime import _lr
from fxslim.runtime.metrics import classification_metrics

__all__ = ["Bound", "Objective", "TrainResult", "batches", "evaluate", "labels_only", "model_device", "train"]

logger = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Bound:
    """An objective bound to one model: ``loss(forward, x, y) -> (loss, logits)`` where
    `forward` runs that model (or its DDP wrapper); `params` are trainable extras (e.g.
    feature projections); `close` removes whatever the binding hooked."""

    loss: Callable[[Forward, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
    params: list[nn.Parameter] = field(default_factory=list)
    close: Callable[[], None] = lambda: None


Objective = Callable[[nn.Module], Bound]


def labels_only(model: nn.Module) -> Bound:
    """The plain objective: cross-entropy against the labels (every batch needs them)."""

    def loss(forward: Forward, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if y is None:
            raise FxslimError("training with labels only needs batches of (inputs, labels)")
        out = forward(x)
        return F.cross_entropy(out.float(), y), out

    return Bound(loss)


@dataclass
class TrainResult:
    """The model (best epoch restored), per-epoch metrics, the learning rate used, each
    tried candidate's score (validation accuracy, loss) when it was chosen, and warnings."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    lr: float = float("nan")
    lr_scores: dict[float, tuple[float, float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU when it has neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def batches(loader: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(inputs, labels or None) on `device`, from batches of (inputs, labels) or inputs alone."""
    for batch in loader:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            yield batch[0].to(device), batch[1].to(device)
        else:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            yield x.to(device), None


@torch.inference_mode()
def _evaluate(model: nn.Module, data: Iterable, device: torch.device, limit: int | None = None
              ) -> tuple[dict[str, float], int]:
    model.eval()
    preds, labels = [], []
    loss, n = 0.0, 0
    for i, (x, y) in enumerate(batches(data, device)):
        if limit is not None and i == limit:
            break
        out = model(x).float()
        preds.append(out.argmax(1).cpu())
        labels.append(y.cpu())
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        n += len(y)
    return classification_metrics(torch.cat(preds), torch.cat(labels)) | {"loss": loss / max(n, 1)}, n


def evaluate(model: nn.Module, data: Iterable, device: torch.device | str | None = None) -> dict[str, float]:
    """Accuracy, macro precision, recall and F1 of a classifier on labelled data, and its
    mean cross-entropy ("loss"), on `device` (default: the model's)."""
    return _evaluate(model, data, torch.device(device) if device is not None else model_device(model))[0]


def _is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _is_dist() else 0


def _mean_over_ranks(value: float, device: torch.device | str) -> float:
    """The same number on every rank (so every rank restores the same best epoch and picks
    the same lr). The tensor lives on the training device: nccl cannot reduce CPU tensors."""
    if not _is_dist():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def _distributed_loader(loader: Any, seed: int) -> Any:
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(loader.dataset, shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers), sampler


class _Stepper:
    """AdamW + the schedule + optional gradient scaling and clipping for one bound objective."""

    def __init__(self, model: nn.Module, bound: Bound, lr: float, total_steps: int, weight_decay: float,
                 clip_grad: float | None, dev: torch.device, use_amp: bool):
        self.params = list(model.parameters()) + list(bound.params)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.sched = _lr.schedule(self.opt, total_steps)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=use_amp)
        self.bound, self.clip, self.dev, self.amp = bound, clip_grad, dev, use_amp

    def step(self, forward: Forward, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.dev.type, enabled=self.amp):
            loss, out = self.bound.loss(forward, x, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip is not None:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.detach(), out.detach()


def _cycle(data: Iterable, dev: torch.device, skip: int, k: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """k batches after the first `skip` of the first pass, starting the data again when it
    runs out (all of it from the second pass on)."""
    done, first = 0, True
    while done < k:
        passed = 0
        for j, batch in enumerate(batches(data, dev)):
            passed += 1
            if first and j < skip:
                continue
            if done == k:
                return
            yield batch
            done += 1
        if passed == 0:
            return
        first = False


@torch.inference_mode()
def _score(model: nn.Module, bound: Bound, scored: list, dev: torch.device) -> tuple[float, float]:
    """(accuracy, mean loss) on the scoring batches; without labels, (0, the objective's loss)."""
    model.eval()
    right = n = 0
    loss = 0.0
    for x, y in scored:
        if y is None:
            loss += float(bound.loss(model, x, y)[0]) * len(x)
        else:
            out = model(x).float()
            right += int((out.argmax(1) == y).sum())
            loss += float(F.cross_entropy(out, y, reduction="sum"))
        n += len(x)
    return right / max(n, 1), loss / max(n, 1)


def _generators(loader: Any) -> list[torch.Generator]:
    """The loader's own random generators (a DataLoader's or its sampler's), which seeding
    torch does not reset."""
    found = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    out: list[torch.Generator] = []
    for g in found:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


def _reseed(seed: int, gens: list[torch.Generator], states: list[torch.Tensor]) -> None:
    """The random state the run starts from: torch seeded, the loader's generators as they were."""
    torch.manual_seed(seed)
    for g, state in zip(gens, states):
        g.set_state(state)


def _choose_lr(model, objective, train_data, val_data, candidates, seed, dev, use_amp, weight_decay,
               clip_grad) -> tuple[float, dict[float, tuple[float, float]]]:
    gens = _generators(train_data)
    states = [g.get_state() for g in gens]
    try:
        return _trials(model, objective, train_data, val_data, candidates, seed, dev, use_amp, weight_decay,
                       clip_grad, gens, states)
    finally:
        _reseed(seed, gens, states)  # the run then sees what it would have seen without trials


def _trials(model, objective, train_data, val_data, candidates, seed, dev, use_amp, weight_decay, clip_grad,
            gens, states) -> tuple[float, dict[float, tuple[float, float]]]:
    steps_per_epoch = len(train_data) if hasattr(train_data, "__len__") else None
    k = _lr.trial_steps(steps_per_epoch)
    if val_data is not None:
        scored, skip = [b for _, b in zip(range(_lr.SCORE_BATCHES), batches(val_data, dev))], 0
    else:  # score on training batches the trials do not train on (the first few of the epoch)
        skip = min(_lr.SCORE_BATCHES, max(1, (steps_per_epoch or 5 * _lr.SCORE_BATCHES) // 5))
        _reseed(seed, gens, states)
        scored = [b for _, b in zip(range(skip), batches(train_data, dev))]
    scores: dict[float, tuple[float, float]] = {}
    for lr in candidates:
        _reseed(seed, gens, states)  # every candidate: the same start and the same batches
        trial = copy.deepcopy(model)
        bound = objective(trial)
        try:
            stepper = _Stepper(trial, bound, lr, k, weight_decay, clip_grad, dev, use_amp)
            trial.train()
            for x, y in _cycle(train_data, dev, skip, k):
                stepper.step(trial, x, y)
            acc, loss = _score(trial, bound, scored, dev)
        finally:
            bound.close()
        if not math.isfinite(loss):
            acc, loss = -1.0, math.inf
        scores[lr] = (_mean_over_ranks(acc, dev), _mean_over_ranks(loss, dev))
    best = max(candidates, key=lambda c: (scores[c][0], -scores[c][1]))
    return best, scores


def check_training_args(model: Any, train_data: Any, val_data: Any, epochs: Any, lr: Any, weight_decay: Any,
                        clip_grad: Any, device: Any, checkpoint_dir: Any) -> None:
    """ArgumentError for what `train` (and so `distill` and `fit`) cannot take, before any work."""
    check_module("model", model)
    _lr.lr_candidates(lr)
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is not None and (isinstance(data, (str, bytes, torch.Tensor)) or not isinstance(data, Iterable)):
            raise ArgumentError(f"{name} must be an iterable of batches (e.g. a DataLoader), got {type(data).__name__}")
    if train_data is None:
        raise ArgumentError("train_data is required")
    positive_int("epochs", epochs)
    number("weight_decay", weight_decay, 0.0)
    number("clip_grad", clip_grad, 0.0, lo_open=True, none=True)
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ArgumentError(f"device must be e.g. 'cpu', 'cuda' or 'cuda:0', got {device!r}") from exc
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise ArgumentError(f"checkpoint_dir must be a path, got {type(checkpoint_dir).__name__}")


def train(
    model: nn.Module,
    objective: Objective,
    train_data: Iterable,
    val_data: Iterable | None = None,
    *,
    epochs: int = 5,
    lr: float | str | Sequence[float] = "auto",
    weight_decay: float = 1e-4,
    clip_grad: float | None = 5.0,
    device: torch.device | str | None = None,
    amp: bool | None = None,
    seed: int = 0,
    callbacks: Sequence[Callable[[int, dict[str, float], nn.Module], None]] = (),
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
) -> TrainResult:
    """Minimise `objective` over `train_data` for `epochs`; keep the best validation epoch.

    Args:
        model: trained in place (the best epoch is restored).
        objective: binds a model to its loss (see `Bound`).
        lr: a number, "auto" (chosen from `_lr.LR_CANDIDATES` by short trials scored on
            `val_data`, at most 4 x 32 extra steps), or a sequence of candidates to choose from.
        device: default the model's device. `amp`: mixed precision (default: on for CUDA).
        seed: seeds torch; the result is a function of the seed.

    Returns:
        A `TrainResult`; `warnings` holds the cut-short warning (also logged).

    Example:
        >>> res = train(net, labels_only, train_loader, val_loader, epochs=10)
        >>> res.lr, res.best_epoch, res.warnings
    """
    check_training_args(model, train_data, val_data, epochs, lr, weight_decay, clip_grad, device, checkpoint_dir)
    candidates = _lr.lr_candidates(lr)
    dev = torch.device(device) if device is not None else model_device(model)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)
    model.to(dev)
    sampler = None
    if _is_dist():
        train_data, sampler = _distributed_loader(train_data, seed)
    rank0 = _rank() == 0
    result = TrainResult(model)
    if len(candidates) > 1:  # trials on plain copies, before DDP hooks the model
        result.lr, result.lr_scores = _choose_lr(model, objective, train_data, val_data, candidates, seed, dev,
                                                 use_amp, weight_decay, clip_grad)
        if rank0:
            logger.info("lr %g chosen from %s", result.lr,
                        ", ".join(f"{c:g}: acc {a:.4f} loss {v:.4f}" for c, (a, v) in result.lr_scores.items()))
    else:
        result.lr = candidates[0]
    forward: nn.Module = model
    if _is_dist():
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    torch.manual_seed(seed)  # from here on, the same run as with lr=result.lr given
    bound = objective(model)
    steps = epochs * len(train_data) if hasattr(train_data, "__len__") else epochs * 100
    stepper = _Stepper(model, bound, result.lr, steps, weight_decay, clip_grad, dev, use_amp)
    best_score, best_state, val_count = (-math.inf,), None, 0
    try:
        for epoch in range(epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            forward.train()
            seen = right = 0
            total = 0.0
            labelled = False
            it: Iterable = batches(train_data, dev)
            if progress and rank0:
                from tqdm.auto import tqdm

                it = tqdm(it, total=len(train_data) if hasattr(train_data, "__len__") else None,
                          desc=f"epoch {epoch + 1}/{epochs}", leave=False)
            for x, y in it:
                loss, out = stepper.step(forward, x, y)
                total += float(loss) * len(x)
                seen += len(x)
                if y is not None:
                    labelled = True
                    right += int((out.argmax(1) == y).sum())
                if progress and rank0 and hasattr(it, "set_postfix"):
                    it.set_postfix(loss=total / seen, acc=right / seen if labelled else float("nan"))
            if _is_dist():  # BatchNorm statistics were updated on each rank's own batches
                for buf in model.buffers():
                    torch.distributed.broadcast(buf, 0)
            metrics = {"epoch": epoch, "train_loss": _mean_over_ranks(total / max(seen, 1), dev)}
            if labelled:
                metrics["train_acc"] = _mean_over_ranks(right / max(seen, 1), dev)
            if val_data is not None:
                val, val_count = _evaluate(model, val_data, dev)
                metrics |= {f"val_{k}": v for k, v in val.items()}
            # ties in accuracy (common near the ceiling: one image in a small validation set)
            # go to the lower validation loss, not to the earliest, least-trained epoch
            score = (metrics["val_accuracy"], -metrics["val_loss"]) if "val_accuracy" in metrics \
                else (-metrics["train_loss"],)
            if score > best_score:
                best_score, best_state, result.best_epoch = score, copy.deepcopy(model.state_dict()), epoch
                if checkpoint_dir is not None and rank0:
                    os.makedirs(checkpoint_dir, exist_ok=True)
                    torch.save(best_state, os.path.join(checkpoint_dir, "best.pt"))
            result.history.append(metrics)
            if rank0:
                logger.info("epoch %d: %s", epoch, metrics)
                for cb in callbacks:
                    cb(epoch, metrics, model)
    finally:
        bound.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    msg = _lr.cut_short_warning(result.history, val_count, result.lr, len(candidates) > 1,
                                result.lr == max(candidates))
    if msg is not None:
        result.warnings.append(msg)
        if rank0:
            logger.warning("%s", msg)
    return result
