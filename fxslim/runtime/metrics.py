"""Classification metrics from predictions and labels (torch only)."""

from __future__ import annotations

import torch

__all__ = ["classification_metrics"]


def classification_metrics(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 (classes seen in either tensor)."""
    pred, labels = pred.long().flatten(), labels.long().flatten()
    classes = torch.unique(torch.cat([pred, labels]))
    p, r, f = [], [], []
    for c in classes:
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        p.append(prec)
        r.append(rec)
        f.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    n = max(len(classes), 1)
    return {
        "accuracy": (pred == labels).float().mean().item() if len(labels) else 0.0,
        "precision": sum(p) / n, "recall": sum(r) / n, "f1": sum(f) / n,
    }
