"""OOD detection metrics. Scores follow the normscore convention: **higher = more ID**.

All metrics are computed from one sort in float64, treat tied scores exactly (a threshold
accepts every sample whose score is >= it, so tied samples are accepted or rejected
together) and agree with scikit-learn's ``roc_auc_score`` / ``average_precision_score`` to
1e-9, ties included.

Two FPR conventions exist in the literature and they give different numbers on the same
scores. normscore names both:

``fpr95`` (ID positive; ODIN, Energy, KNN, ReAct, FeatureNorm, LDG papers)
    The threshold is the highest one that still accepts at least 95% of ID samples. ``fpr95``
    is the share of OOD samples accepted (scoring >= threshold) there.

``fpr95_oodpos`` (OOD positive; OE code, OpenOOD >= v1.5, pytorch-ood)
    Flip the roles: "detected" means score <= threshold. The threshold is the one that detects
    at least 95% of OOD samples; ``fpr95_oodpos`` is the share of ID samples wrongly flagged
    as OOD there.

Worked example: ID scores ``[5, 4, 3, 2, 1]`` and OOD scores ``[3.5, 0, 0, 0, 0]``.
To accept >= 95% of ID (all 5) the threshold is 1; OOD accepted: only 3.5 -> ``fpr95 = 0.2``.
To flag >= 95% of OOD (all 5) we must flag every score <= 3.5; ID flagged: 3, 2, 1 ->
``fpr95_oodpos = 0.6``.

``detection_error`` is ``min_t 0.5 * (1 - TPR(t)) + 0.5 * FPR(t)`` (equal class priors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .errors import InputError

__all__ = ["aupr", "auroc", "evaluate", "fpr_at_tpr", "roc_curve"]

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


def _as_array(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise InputError(f"{name} is empty; metrics need at least one ID and one OOD score.")
    if not np.isfinite(a).all():
        raise InputError(f"{name} contains NaN or Inf scores; metrics are undefined. Remove them first.")
    return a


def _curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positive counts at each distinct threshold, thresholds descending.

    A sample is "positive-predicted" when its score >= threshold.
    """
    s = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return tps, fps, s[last]


def roc_curve(id_scores: object, ood_scores: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` with ID as positive, starting at (0, 0)."""
    pos, neg = _as_array(id_scores, "id_scores"), _as_array(ood_scores, "ood_scores")
    tps, fps, thr = _curve(pos, neg)
    return np.r_[0.0, fps / neg.size], np.r_[0.0, tps / pos.size], np.r_[np.inf, thr]


def auroc(id_scores: object, ood_scores: object) -> float:
    """Area under the ROC curve (probability that an ID score exceeds an OOD score, ties 1/2)."""
    fpr, tpr, _ = roc_curve(id_scores, ood_scores)
    return float(_trapezoid(tpr, fpr))


def aupr(pos_scores: object, neg_scores: object) -> float:
    """Average precision with ``pos_scores`` as the positive class (sklearn's definition)."""
    pos, neg = _as_array(pos_scores, "pos_scores"), _as_array(neg_scores, "neg_scores")
    tps, fps, _ = _curve(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(pos_scores: object, neg_scores: object, tpr: float = 0.95) -> float:
    """Share of negatives with score >= the highest threshold keeping ``tpr`` of positives."""
    if not 0.0 < tpr <= 1.0:
        raise InputError(f"tpr must be in (0, 1], got {tpr}.")
    pos, neg = _as_array(pos_scores, "pos_scores"), _as_array(neg_scores, "neg_scores")
    tps, fps, _ = _curve(pos, neg)
    need = math.ceil(tpr * pos.size - 1e-9)
    k = int(np.searchsorted(tps, need, side="left"))
    return float(fps[min(k, fps.size - 1)] / neg.size)


def evaluate(id_scores: object, ood_scores: object, *, tpr: float = 0.95) -> dict[str, float]:
    """All metrics for one ID/OOD pair of score arrays (higher = more ID).

    Returns ``auroc``, ``aupr_in`` (ID positive), ``aupr_out`` (OOD positive, scores negated),
    ``fpr95`` (ID positive), ``fpr95_oodpos`` (OOD positive), ``detection_error``,
    ``n_id`` and ``n_ood``. With ``tpr`` other than 0.95 the FPR keys are still named
    ``fpr95``/``fpr95_oodpos`` but are computed at that rate; use :func:`fpr_at_tpr` directly
    for clarity.
    """
    s_id, s_ood = _as_array(id_scores, "id_scores"), _as_array(ood_scores, "ood_scores")
    tps, fps, _ = _curve(s_id, s_ood)
    tpr_c = np.r_[0.0, tps / s_id.size]
    fpr_c = np.r_[0.0, fps / s_ood.size]
    return {
        "auroc": float(_trapezoid(tpr_c, fpr_c)),
        "aupr_in": aupr(s_id, s_ood),
        "aupr_out": aupr(-s_ood, -s_id),
        "fpr95": fpr_at_tpr(s_id, s_ood, tpr),
        "fpr95_oodpos": fpr_at_tpr(-s_ood, -s_id, tpr),
        "detection_error": float(np.min(0.5 * (1.0 - tpr_c) + 0.5 * fpr_c)),
        "n_id": int(s_id.size),
        "n_ood": int(s_ood.size),
    }


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average metric dicts (e.g. over OOD sets); count keys are summed."""
    out: dict[str, float] = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        out[k] = float(sum(vals)) if k.startswith("n_") else float(np.mean(vals))
    return out
