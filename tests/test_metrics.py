"""Metrics against scikit-learn (ties included) and the two FPR conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from normscore import metrics
from normscore.errors import InputError


def _sk(id_s, ood_s):
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
    }


def _fpr_ref(pos, neg, tpr=0.95):
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fpr, tp, _ = roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
    return fpr[np.searchsorted(tp, tpr - 1e-12, side="left")]


@pytest.mark.parametrize("seed", range(12))
def test_equal_to_sklearn_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(1, 300, 2)
    if seed % 2:  # heavy ties: small integer scores
        id_s, ood_s = rng.integers(0, 5, n_id).astype(float), rng.integers(0, 4, n_ood).astype(float)
    else:
        id_s, ood_s = rng.normal(1, 1, n_id), rng.normal(0, 1, n_ood)
    m = metrics.evaluate(id_s, ood_s)
    ref = _sk(id_s, ood_s)
    for k, v in ref.items():
        assert abs(m[k] - v) < 1e-9, (k, m[k], v)
    assert abs(m["fpr95"] - _fpr_ref(id_s, ood_s)) < 1e-12
    assert abs(m["fpr95_oodpos"] - _fpr_ref(-ood_s, -id_s)) < 1e-12


def test_worked_example_from_the_docstring():
    m = metrics.evaluate([5, 4, 3, 2, 1], [3.5, 0, 0, 0, 0])
    assert m["fpr95"] == pytest.approx(0.2)
    assert m["fpr95_oodpos"] == pytest.approx(0.6)
    assert m["auroc"] == pytest.approx(1 - 3 / 25)  # 3.5 beats 3, 2 and 1


def test_perfect_random_and_inverted_detectors():
    assert metrics.evaluate([2, 3], [0, 1]) | {} == {
        "auroc": 1.0,
        "aupr_in": 1.0,
        "aupr_out": 1.0,
        "fpr95": 0.0,
        "fpr95_oodpos": 0.0,
        "detection_error": 0.0,
        "n_id": 2,
        "n_ood": 2,
    }
    m = metrics.evaluate([1.0, 1.0], [1.0, 1.0, 1.0])
    assert m["auroc"] == 0.5 and m["fpr95"] == 1.0 and m["detection_error"] == 0.5
    assert metrics.evaluate([0, 1], [2, 3])["auroc"] == 0.0


def test_accepts_tensors_and_rejects_bad_input():
    m = metrics.evaluate(torch.tensor([1.0, 2.0]), torch.tensor([0.0]))
    assert m["auroc"] == 1.0
    with pytest.raises(InputError, match="empty"):
        metrics.evaluate([], [1.0])
    with pytest.raises(InputError, match="NaN"):
        metrics.evaluate([float("nan")], [1.0])


def test_detection_error_matches_brute_force():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 20, 50).astype(float), rng.integers(0, 15, 40).astype(float)
    best = 1.0
    for t in np.r_[np.unique(np.r_[a, b]), np.inf]:
        best = min(best, 0.5 * np.mean(a < t) + 0.5 * np.mean(b >= t))
    assert metrics.evaluate(a, b)["detection_error"] == pytest.approx(best)
