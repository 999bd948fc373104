"""Built-in offline material: scikit-learn's handwritten digits and a small ResNet for them.

The digits are 1797 real 8x8 grey images (0..16) of the ten digits; they ship with
scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxslim.runtime import train as _train
from fxslim.runtime.train import model_device

__all__ = ["MNIST1DCNN", "DigitsResNet", "accuracy", "digits_loaders", "digits_splits", "fit", "mnist1d_loaders"]


def digits_loaders(batch_size: int = 64, seed: int = 0, val_share: float = 0.2) -> tuple[DataLoader, DataLoader]:
    """Stratified, seeded train/validation loaders over sklearn's digits, as (N, 1, 8, 8) floats."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = d.target.astype(np.int64)
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=val_share, stratify=y, random_state=seed)
    g = torch.Generator().manual_seed(seed)
    train = TensorDataset(torch.from_numpy(xtr)[:, None], torch.from_numpy(ytr))
    val = TensorDataset(torch.from_numpy(xva)[:, None], torch.from_numpy(yva))
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(val, batch_size=256))


def digits_splits(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Stratified, seeded 60/20/20 train/validation/test loaders over sklearn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = d.target.astype(np.int64)
    xtr, xrest, ytr, yrest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=seed)
    xva, xte, yva, yte = train_test_split(xrest, yrest, test_size=0.5, stratify=yrest, random_state=seed)
    g = torch.Generator().manual_seed(seed)

    def ds(a, b):
        return TensorDataset(torch.from_numpy(a)[:, None], torch.from_numpy(b))

    return (DataLoader(ds(xtr, ytr), batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(ds(xva, yva), batch_size=256), DataLoader(ds(xte, yte), batch_size=256))


def mnist1d_loaders(batch_size: int = 128, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """MNIST-1D (built offline by the `mnist1d` package): 4000 train / 1000 test signals of
    length 40, as (N, 1, 40) floats. Its authors report logistic regression 32%, MLP 68%,
    CNN 94%, human 96%."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42  # the published dataset; `seed` only shuffles batches
    d = make_dataset(args)
    g = torch.Generator().manual_seed(seed)
    tr = TensorDataset(torch.tensor(d["x"], dtype=torch.float32)[:, None], torch.tensor(d["y"]).long())
    te = TensorDataset(torch.tensor(d["x_test"], dtype=torch.float32)[:, None], torch.tensor(d["y_test"]).long())
    return DataLoader(tr, batch_size=batch_size, shuffle=True, generator=g), DataLoader(te, batch_size=512)


class MNIST1DCNN(nn.Module):
    """A 1-D CNN for MNIST-1D (three conv layers with BatchNorm, global pool, linear head)."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv1d(1, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Conv1d(w, w, 3, padding=1, stride=2), nn.BatchNorm1d(w), nn.ReLU(),
            nn.Conv1d(w, 2 * w, 3, padding=1, stride=2), nn.BatchNorm1d(2 * w), nn.ReLU(),
            nn.Conv1d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm1d(2 * w), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * w * 10, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
    )


class DigitsResNet(nn.Module):
    """A ResNet-style CNN for 8x8 digits: two stages of residual blocks, global pool, linear head."""

    def __init__(self, width: int = 64, num_classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1, self.block2 = _block(w, w), _block(w, w)
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.block3, self.block4 = _block(w, 2 * w, stride=2), _block(2 * w, 2 * w)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(x + self.block1(x))
        x = self.relu(x + self.block2(x))
        x = self.relu(self.down(x) + self.block3(x))
        x = self.relu(x + self.block4(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def fit(model: nn.Module, train: DataLoader, epochs: int = 3, lr: float | str | Sequence[float] = "auto",
        seed: int = 0, val: DataLoader | None = None, **kwargs) -> nn.Module:
    """Train with labels only (cross-entropy, AdamW, short warm-up + cosine decay) on the
    model's device; returns the model in eval mode.

    The same loop as `fxslim.distill` (`fxslim.runtime.train.train`), so a label-only
    baseline and distillation differ only in their loss: `lr="auto"` chooses this loss's
    own learning rate by short trials (at most 4 x 32 extra steps), scored on `val` (or on
    held-out training batches). With `val`, the best epoch is restored and a run cut short
    is logged as a warning. `kwargs` go to `train` (weight_decay, clip_grad, device, ...);
    call `fxslim.runtime.train.train(model, labels_only, ...)` for the whole
    `TrainResult` (chosen lr, history, warnings).

    Example:
        >>> net = fit(DigitsResNet(), train, epochs=10, val=val)
    """
    kwargs.setdefault("clip_grad", None)
    return _train.train(model, _train.labels_only, train, val, epochs=epochs, lr=lr, seed=seed, **kwargs).model


@torch.inference_mode()
def accuracy(model: nn.Module, data: DataLoader) -> float:
    """Top-1 accuracy in [0, 1], on the model's device."""
    model.eval()
    dev = model_device(model)
    right = total = 0
    for x, y in data:
        right += (model(x.to(dev)).argmax(1) == y.to(dev)).sum().item()
        total += len(y)
    return right / max(total, 1)
