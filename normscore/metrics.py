"""OOD detection metrics. Scores follow the normscore convention: **higher = more ID**.

All metrics are computed from one sort in float64, treat tied scores exactly (a threshold
accepts every sample whose score is >= it, so tied samples are accepted or rejected
together) and agree with scikit-learn to 1e-9, ties included (``roc_auc_score``,
``average_precision_score``, ``auc`` of ``precision_recall_curve``).

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

Two AUPR conventions exist as well. Both put the positive class first and use the
precision-recall points ``(R_k, P_k)`` at the distinct thresholds ``t_1 > t_2 > ... > t_n``
(``P_k`` = precision, ``R_k`` = recall of "score >= t_k"; ``R_0 = 0``, ``P_0 = 1``):

``aupr_in`` / ``aupr_out`` (average precision; OE, Energy, ReAct, KNN code, scikit-learn)
    ``AP = sum_k (R_k - R_{k-1}) * P_k``: a step function, no interpolation
    (``sklearn.metrics.average_precision_score``).

``aupr_in_trapz`` / ``aupr_out_trapz`` (trapezoid rule; OpenOOD v1.5's ``AUPR_IN`` / ``AUPR_OUT``)
    ``sum_k (R_k - R_{k-1}) * (P_k + P_{k-1}) / 2``: the PR curve integrated with straight
    lines between the points (``sklearn.metrics.auc(recall, precision)`` on
    ``precision_recall_curve``).

The two differ in both directions. Without ties every recall step is one positive sample, whose
precision is at least the previous point's, so the trapezoid is never above AP (up to 0.002
below it at 300 continuous scores per set, less on larger sets). A tied group is one point, and
the straight line to it from the previous point is optimistic: all scores equal gives AP = pi
and trapezoid (1 + pi) / 2 (pi = share of positives; equal set sizes: 0.5 vs 0.75). Saturated
scores (``msp`` = 1.0 in float32) are such ties.

``_in`` takes ID as the positive class (scores as they are), ``_out`` OOD (scores negated).

``detection_error`` is ``min_t 0.5 * (1 - TPR(t)) + 0.5 * FPR(t)`` (equal class priors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .errors import InputError

__all__ = ["METRICS", "aupr", "aupr_trapz", "auroc", "evaluate", "fpr_at_tpr", "roc_curve"]

#: the score metrics of :func:`evaluate` with a one-line definition each (the counts ``n_id``,
#: ``n_ood`` are not listed)
METRICS: dict[str, str] = {
    "auroc": "area under the ROC curve, ID positive (P(score_ID > score_OOD) + P(tie) / 2)",
    "fpr95": "ID positive: share of OOD samples accepted at the threshold that keeps 95% of ID",
    "fpr95_oodpos": "OOD positive (OpenOOD v1.5): share of ID samples rejected at the threshold that catches 95% of OOD",
    "aupr_in": "average precision, ID positive (scikit-learn average_precision_score; step-wise PR area)",
    "aupr_out": "average precision, OOD positive (scores negated)",
    "aupr_in_trapz": "PR-curve area by the trapezoid rule, ID positive (OpenOOD v1.5 AUPR_IN)",
    "aupr_out_trapz": "PR-curve area by the trapezoid rule, OOD positive (OpenOOD v1.5 AUPR_OUT)",
    "detection_error": "min over thresholds of (1 - TPR) / 2 + FPR / 2 (equal priors)",
}

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


def _pr_points(pos_scores: object, neg_scores: object) -> tuple[np.ndarray, np.ndarray]:
    """``(recall, precision)`` at each distinct threshold, thresholds descending."""
    pos, neg = _as_array(pos_scores, "pos_scores"), _as_array(neg_scores, "neg_scores")
    tps, fps, _ = _curve(pos, neg)
    return tps / pos.size, tps / (tps + fps)


def aupr(pos_scores: object, neg_scores: object) -> float:
    """Average precision with ``pos_scores`` as the positive class: ``sum_k (R_k - R_{k-1}) P_k``
    (step-wise, scikit-learn's ``average_precision_score``; the ``aupr_in``/``aupr_out`` keys)."""
    recall, precision = _pr_points(pos_scores, neg_scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_trapz(pos_scores: object, neg_scores: object) -> float:
    """Area under the precision-recall curve by the trapezoid rule, ``pos_scores`` positive:
    ``sum_k (R_k - R_{k-1}) (P_k + P_{k-1}) / 2`` from ``(R_0, P_0) = (0, 1)`` (OpenOOD v1.5's
    ``auc(recall, precision)`` on scikit-learn's ``precision_recall_curve``; the
    ``aupr_in_trapz``/``aupr_out_trapz`` keys). See the module docstring for how it differs from
    :func:`aupr`."""
    recall, precision = _pr_points(pos_scores, neg_scores)
    return float(_trapezoid(np.r_[1.0, precision], np.r_[0.0, recall]))


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

    Returns ``auroc``, ``fpr95`` (ID positive), ``fpr95_oodpos`` (OOD positive), ``aupr_in``
    (average precision, ID positive), ``aupr_out`` (average precision, OOD positive, scores
    negated), ``aupr_in_trapz`` / ``aupr_out_trapz`` (trapezoid-rule PR area, OpenOOD's
    ``AUPR_IN`` / ``AUPR_OUT``), ``detection_error``, ``n_id`` and ``n_ood`` (see
    :data:`METRICS` and the module docstring). With ``tpr`` other than 0.95 the FPR keys are still named
    ``fpr95``/``fpr95_oodpos`` but are computed at that rate; use :func:`fpr_at_tpr` directly
    for clarity.
    """
    s_id, s_ood = _as_array(id_scores, "id_scores"), _as_array(ood_scores, "ood_scores")
    tps, fps, _ = _curve(s_id, s_ood)
    tpr_c = np.r_[0.0, tps / s_id.size]
    fpr_c = np.r_[0.0, fps / s_ood.size]
    return {
        "auroc": float(_trapezoid(tpr_c, fpr_c)),
        "fpr95": fpr_at_tpr(s_id, s_ood, tpr),
        "fpr95_oodpos": fpr_at_tpr(-s_ood, -s_id, tpr),
        "aupr_in": aupr(s_id, s_ood),
        "aupr_out": aupr(-s_ood, -s_id),
        "aupr_in_trapz": aupr_trapz(s_id, s_ood),
        "aupr_out_trapz": aupr_trapz(-s_ood, -s_id),
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
