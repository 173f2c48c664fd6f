"""The hyperparameter search of ``--search``: every combination of a detector's
``search_space`` is scored on validation ID vs validation OOD; the highest AUROC wins (ties: the
first in grid order). One rule, :func:`best_by_val_auroc`, for cached and live detectors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..detectors.registry import detector_class
from ..metrics import evaluate
from ..select import grid  # one grid order for --search and normscore.select

__all__ = ["best_by_val_auroc", "grid", "search_configs", "val_auroc"]

T = TypeVar("T")

CRITERION = "highest validation AUROC (ties: first in grid order)"


def search_configs(name: str, search: bool) -> list[dict[str, Any]]:
    """The configurations to try for detector ``name``: its grid with ``search``, else ``[{}]``."""
    if not search:
        return [{}]
    return grid(dict(detector_class(name).search_space))


def val_auroc(s_id: np.ndarray, s_ood: np.ndarray) -> float:
    """AUROC of validation ID vs validation OOD scores; NaN if a score is not finite."""
    if not (np.isfinite(s_id).all() and np.isfinite(s_ood).all()):
        return float("nan")
    return float(evaluate(s_id, s_ood)["auroc"])


def best_by_val_auroc(
    configs: list[dict[str, Any]],
    val_scores: Callable[[dict[str, Any]], tuple[np.ndarray, np.ndarray, T]],
    record: list[dict[str, Any]],
) -> tuple[int, T] | None:
    """``(index, payload)`` of the configuration with the highest validation AUROC (the first
    of equal ones), or ``None`` if none scored a finite AUROC. ``val_scores(config)`` returns
    the validation ID scores, the validation OOD scores and a payload (e.g. the fitted
    detector); each ``{"params", "val_auroc"}`` is appended to ``record``."""
    best: tuple[int, T] | None = None
    best_auc = -math.inf
    for i, c in enumerate(configs):
        s_id, s_ood, payload = val_scores(c)
        auc = val_auroc(s_id, s_ood)
        record.append({"params": c, "val_auroc": auc})
        if auc > best_auc:
            best, best_auc = (i, payload), auc
    return best
