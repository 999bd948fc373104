"""The learning rate and its schedule for `fxslim.runtime.train.train` (and so for
`fxslim.distill` and `examples.fit`), and the check that a run was cut short.

Schedule, for T steps and peak lr: a linear warm-up from lr/10 over the first
w = min(T // 20, 50) steps (at most 5% of the run, however few the epochs), then a cosine
decay from lr to 0 over the rest::

    f(s) = 0.1 + 0.9 (s + 1) / w                          s < w
    f(s) = (1 + cos(pi (s - w) / (T - w))) / 2            s >= w    (0 past T)

Learning-rate choice ("auto"): every candidate lr trains a copy of the model for k steps
on the same first k training batches, under the same schedule compressed to k steps, and
is scored on at most `SCORE_BATCHES` validation batches (accuracy, then lower loss); the
best candidate wins. k = clip(steps per epoch, MIN_TRIAL_STEPS, MAX_TRIAL_STEPS), so the
whole choice costs at most len(candidates) x MAX_TRIAL_STEPS steps plus one short
evaluation per candidate, whatever the number of epochs.

Cut short: the best epoch is the last one and its validation accuracy beats every earlier
epoch by more than one standard error of a validation accuracy, sqrt(p (1 - p) / n), and
by more than one example (near 100% the standard error is under one example): the run
was still improving measurably when it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fxslim.errors import ArgumentError

__all__ = [
    "LR_CANDIDATES",
    "cut_short_warning",
    "lr_candidates",
    "schedule",
    "trial_steps",
]

# AdamW learning rates, factor ~3 apart; fine-tuning pruned CNNs has needed 1e-3 .. 1e-2
LR_CANDIDATES = (3e-4, 1e-3, 3e-3, 1e-2)
MIN_TRIAL_STEPS, MAX_TRIAL_STEPS, SCORE_BATCHES = 16, 32, 8


def lr_candidates(lr: float | str | Sequence[float]) -> tuple[float, ...]:
    """The learning rates to try: one (a number), the default grid ("auto"), or the user's."""
    if isinstance(lr, str):
        if lr != "auto":
            raise ArgumentError(f"lr={lr!r}: pass a positive number, 'auto', or a sequence of numbers to try")
        return LR_CANDIDATES
    values = tuple(lr) if isinstance(lr, Sequence) else (lr,)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                              and math.isfinite(v) for v in values):
        raise ArgumentError(f"lr={lr!r}: pass a positive number, 'auto', or a sequence of numbers to try")
    return tuple(float(v) for v in values)


def trial_steps(steps_per_epoch: int | None) -> int:
    """Steps each candidate trains for: about one epoch, within [MIN_TRIAL_STEPS, MAX_TRIAL_STEPS]."""
    return min(max(steps_per_epoch or MAX_TRIAL_STEPS, MIN_TRIAL_STEPS), MAX_TRIAL_STEPS)


def schedule(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Short linear warm-up, then cosine decay to zero over `total_steps` (see the module doc)."""
    total = max(int(total_steps), 1)
    warm = min(total // 20, 50)

    def factor(step: int) -> float:
        if step < warm:
            return 0.1 + 0.9 * (step + 1) / warm
        if step >= total:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def cut_short_warning(history: Sequence[dict[str, float]], val_count: int, lr: float,
                      lr_was_chosen: bool, top_candidate: bool) -> str | None:
    """A message saying which knob to turn when the run was still improving at its last
    epoch (see the module doc), else None. Needs validation accuracy in `history`."""
    accs = [h.get("val_accuracy") for h in history]
    if len(accs) < 2 or any(a is None for a in accs) or val_count <= 0:
        return None
    last, before = accs[-1], max(accs[:-1])
    p = min(max(last, 1.0 / val_count), 1.0 - 1.0 / val_count)
    se = math.sqrt(p * (1.0 - p) / val_count)
    gained = round(last * val_count) - round(before * val_count)  # examples; accuracies are float32
    if last - before <= se or gained <= 1:
        return None
    epochs = len(history)
    knob = f"train longer (epochs={2 * epochs})"
    if not lr_was_chosen:
        knob += f" or try a higher lr than {lr:g} (lr='auto' chooses one)"
    elif top_candidate:
        knob += f" or allow a higher lr than {lr:g}, the largest tried (lr=[...])"
    return (f"the last epoch was the best and still improving (validation accuracy {before:.4f} -> {last:.4f}, "
            f"{gained} of {val_count} examples, more than one standard error, {se:.4f}): the run was probably cut "
            f"short; {knob}")
