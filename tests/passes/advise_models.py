"""Small models and data for the advisor's tests (also reachable as `package.module:function` specs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxslim.runtime.examples import DigitsResNet


class TinyNet(nn.Module):
    """Two convs with BatchNorm, global pool, a linear head: prunable in two groups."""

    def __init__(self, width: int = 12, classes: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def blobs(n: int, seed: int, classes: int = 3) -> TensorDataset:
    """n 8x8 images: each class a bright quadrant plus noise (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.8
    for c in range(classes):
        r, q = divmod(c, 2)
        x[y == c, :, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 1.5
    return TensorDataset(x, y)


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train, val): 96 training images in batches of 32 (shuffled by a seeded generator), 60 for validation."""
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(blobs(96, 1), batch_size=32, shuffle=True, generator=g),
        DataLoader(blobs(60, 2), batch_size=64),
    )


def small_digits() -> nn.Module:
    """The built-in digits architecture at width 8 (fast enough for a command-line test)."""
    return DigitsResNet(width=8)
