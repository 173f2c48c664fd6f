"""Metrics against scikit-learn (ties included), the two FPR and the two AUPR conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from normscore import metrics
from normscore.errors import InputError


def _sk(id_s, ood_s):
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    s = np.r_[id_s, ood_s]
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
        "aupr_in_trapz": _openood_aupr(y, s),
        "aupr_out_trapz": _openood_aupr(1 - y, -s),
    }


def _openood_aupr(y, s):
    """OpenOOD v1.5 (openood/evaluators/metrics.py): ``metrics.auc(recall, precision)`` on
    ``precision_recall_curve``; AUPR_IN with ID positive and ``conf``, AUPR_OUT with OOD
    positive and ``-conf``."""
    precision, recall, _ = precision_recall_curve(y, s)
    return auc(recall, precision)


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
        "aupr_in_trapz": 1.0,
        "aupr_out_trapz": 1.0,
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


def test_the_two_aupr_conventions_differ_as_documented():
    """Average precision (aupr_*) vs the trapezoid rule (aupr_*_trapz, OpenOOD): without ties the
    trapezoid is never above AP and close to it; a tied group is interpolated linearly."""
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(20):
        id_s, ood_s = rng.normal(1, 1, 400), rng.normal(0, 1, 600)
        m = metrics.evaluate(id_s, ood_s)
        for side in ("in", "out"):
            gap = m[f"aupr_{side}"] - m[f"aupr_{side}_trapz"]
            assert 0.0 <= gap < 0.005, (side, gap)
            gaps.append(gap)
    assert max(gaps) > 1e-4  # they are not the same number
    # all scores tied: one PR point (recall 1, precision = share of positives)
    m = metrics.evaluate(np.zeros(30), np.zeros(30))
    assert m["aupr_in"] == pytest.approx(0.5) and m["aupr_in_trapz"] == pytest.approx(0.75)
    m = metrics.evaluate(np.zeros(10), np.zeros(90))
    assert m["aupr_in"] == pytest.approx(0.1) and m["aupr_in_trapz"] == pytest.approx(0.55)
    assert m["aupr_out"] == pytest.approx(0.9) and m["aupr_out_trapz"] == pytest.approx(0.95)
    # the worked example of docs/metrics.md: ID [3, 2], OOD [2, 0]; (R, P): (0, 1), (1/2, 1), (1, 2/3)
    m = metrics.evaluate([3.0, 2.0], [2.0, 0.0])
    assert m["aupr_in"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert m["aupr_in_trapz"] == pytest.approx(0.5 + 0.5 * (1 + 2 / 3) / 2)


def test_functions_and_metric_table():
    id_s, ood_s = np.array([3.0, 2.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.0])
    m = metrics.evaluate(id_s, ood_s)
    assert m["aupr_in_trapz"] == metrics.aupr_trapz(id_s, ood_s)
    assert m["aupr_out_trapz"] == metrics.aupr_trapz(-ood_s, -id_s)
    assert m["aupr_in"] == metrics.aupr(id_s, ood_s)
    assert set(metrics.METRICS) == set(m) - {"n_id", "n_ood"}


def _openood_v15(id_s, ood_s):
    """OpenOOD v1.5's ``auc_and_fpr_recall`` (openood/evaluators/metrics.py, Dec 2023 onwards),
    restated: ``conf`` higher = ID, OOD is the positive class."""
    conf = np.r_[id_s, ood_s]
    ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr_list, tpr_list, _ = roc_curve(ood, -conf)  # sklearn's default drop_intermediate=True
    p_in, r_in, _ = precision_recall_curve(1 - ood, conf)
    p_out, r_out, _ = precision_recall_curve(ood, -conf)
    return {
        "FPR@95": fpr_list[np.argmax(tpr_list >= 0.95)],
        "AUROC": auc(fpr_list, tpr_list),
        "AUPR_IN": auc(r_in, p_in),
        "AUPR_OUT": auc(r_out, p_out),
    }


@pytest.mark.parametrize("ties", [False, True])
def test_openood_columns_line_by_line(ties):
    """docs/metrics.md's mapping: FPR@95 = fpr95_oodpos, AUROC = auroc, AUPR_IN = aupr_in_trapz,
    AUPR_OUT = aupr_out_trapz. OpenOOD's FPR@95 uses roc_curve's default drop_intermediate=True,
    which can skip the exact 95% point on tied scores, so it is compared without ties only."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        id_s, ood_s = rng.normal(1, 1, rng.integers(20, 400)), rng.normal(0, 1, rng.integers(20, 400))
        if ties:
            id_s, ood_s = np.round(id_s * 2), np.round(ood_s * 2)
        m, ref = metrics.evaluate(id_s, ood_s), _openood_v15(id_s, ood_s)
        assert abs(m["auroc"] - ref["AUROC"]) < 1e-9
        assert abs(m["aupr_in_trapz"] - ref["AUPR_IN"]) < 1e-9
        assert abs(m["aupr_out_trapz"] - ref["AUPR_OUT"]) < 1e-9
        if not ties:
            assert m["fpr95_oodpos"] == pytest.approx(ref["FPR@95"], abs=1e-12)
