"""Callables for the `package.module:function` spec form (the tests' own model, data, inputs)."""

from __future__ import annotations

import torch

from fxslim.runtime.examples import DigitsResNet, digits_loaders


def tiny_digits() -> torch.nn.Module:
    """DigitsResNet at width 8: a pipeline over it runs in seconds."""
    return DigitsResNet(width=8)


def digits_data(seed: int = 0):
    return digits_loaders(batch_size=32, seed=seed)


def digits_inputs() -> torch.Tensor:
    return torch.zeros(1, 1, 8, 8)


def not_a_model() -> int:
    return 3
