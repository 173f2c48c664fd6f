"""Long-tail subsampling and many/medium/few-shot accuracy.

Profile (as in the RNA / PASCL code for CIFAR-LT): class ``c`` in ``0..C-1`` keeps

    n_c = floor(n_max * rho ** (c / (C - 1)))

samples, where ``n_max`` is the size of the largest class (by default the smallest class size
of the balanced source set, so every class can supply its quota) and ``rho = n_min / n_max`` is
the imbalance ratio (``rho = 0.01`` is "imbalance factor 100"). Class 0 is the head, class
``C-1`` the tail. The kept samples are the **first** ``n_c`` samples of each class in dataset
order, so the subset is deterministic and needs no seed.

Shot groups (:func:`shot_groups`) follow the official RNA / PASCL evaluation: for ``C <= 100``
classes, with the training counts sorted in decreasing order as ``s``, a class is *many-shot*
when ``n_c > s[int(0.34 C)]``, *few-shot* when ``n_c < s[int(0.67 C)]`` and *medium-shot*
otherwise; for more classes the ImageNet-LT thresholds apply (many ``> 100``, few ``< 20``).
For Fashion-MNIST-LT (``C = 10``, ``rho = 0.01``) that is classes 0-2 many, 3-6 medium, 7-9 few.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["long_tail_counts", "long_tail_indices", "long_tail_subset", "shot_accuracy", "shot_groups"]


def long_tail_counts(n_max: int, num_classes: int, rho: float = 0.01) -> list[int]:
    """Per-class counts ``floor(n_max * rho ** (c / (C - 1)))`` for ``c = 0..C-1``."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}.")
    if not 0.0 < rho <= 1.0:
        raise ConfigError(f"the imbalance ratio rho must be in (0, 1], got {rho}.")
    if n_max < 1:
        raise ConfigError(f"n_max must be >= 1, got {n_max}.")
    if num_classes == 1:
        return [int(n_max)]
    # the small epsilon keeps exact products (e.g. 6000 * 0.01 = 60) from flooring to 59
    return [max(1, math.floor(n_max * rho ** (c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def _labels_of(dataset: object) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[index, arg-type]
    return np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64).reshape(-1)


def long_tail_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    rho: float = 0.01,
    *,
    num_classes: int | None = None,
    n_max: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Indices of the long-tail subset (the first ``n_c`` of each class, sorted) and the counts.

    ``n_max`` defaults to the smallest class size of ``labels``; a class with fewer samples
    than its quota raises ``ConfigError`` (a ``ValueError``).
    """
    y = np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64).reshape(-1)
    c_total = int(num_classes if num_classes is not None else y.max() + 1)
    per_class = [np.flatnonzero(y == c) for c in range(c_total)]
    sizes = [len(p) for p in per_class]
    if min(sizes) == 0:
        raise ConfigError(f"class {sizes.index(0)} has no samples; cannot build a long-tail subset.")
    counts = long_tail_counts(int(n_max if n_max is not None else min(sizes)), c_total, rho)
    for c, (need, have) in enumerate(zip(counts, sizes)):
        if need > have:
            raise ConfigError(f"class {c} needs {need} samples for the profile but has only {have}; lower n_max.")
    idx = np.sort(np.concatenate([p[:n] for p, n in zip(per_class, counts)]))
    return idx, counts


def long_tail_subset(
    dataset: torch.utils.data.Dataset, rho: float = 0.01, *, n_max: int | None = None
) -> tuple[torch.utils.data.Subset, list[int]]:
    """A ``torch.utils.data.Subset`` with the long-tail profile, and its per-class counts.

    Labels are read from ``dataset.labels`` / ``dataset.targets`` (else by iterating).
    """
    idx, counts = long_tail_indices(_labels_of(dataset), rho, n_max=n_max)
    return torch.utils.data.Subset(dataset, idx.tolist()), counts


def shot_groups(train_counts: Sequence[int]) -> dict[str, list[int]]:
    """Class indices of the many-, medium- and few-shot groups (see the module docstring)."""
    counts = [int(n) for n in train_counts]
    c = len(counts)
    if c <= 100:
        srt = sorted(counts, reverse=True)
        many_thr, few_thr = srt[int(0.34 * c)], srt[int(0.67 * c)]
    else:
        many_thr, few_thr = 100, 20
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for k, n in enumerate(counts):
        if n > many_thr:
            groups["many"].append(k)
        elif n < few_thr:
            groups["few"].append(k)
        else:
            groups["medium"].append(k)
    return groups


def shot_accuracy(
    preds: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, train_counts: Sequence[int]
) -> dict[str, Any]:
    """Top-1 accuracy: ``overall`` (over samples), ``many``/``medium``/``few`` (mean of per-class
    accuracies within each group; NaN for an empty group) and ``per_class``."""
    p = np.asarray(torch.as_tensor(preds).cpu().numpy()).reshape(-1)
    y = np.asarray(torch.as_tensor(labels).cpu().numpy()).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"preds {p.shape} and labels {y.shape} must be non-empty and of one shape")
    c = len(train_counts)
    per_class = [float((p[y == k] == k).mean()) if (y == k).any() else float("nan") for k in range(c)]
    out: dict[str, Any] = {"overall": float((p == y).mean())}
    for g, members in shot_groups(train_counts).items():
        vals = [per_class[k] for k in members if not math.isnan(per_class[k])]
        out[g] = float(np.mean(vals)) if vals else float("nan")
    out["per_class"] = per_class
    return out
