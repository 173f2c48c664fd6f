"""Property tests (hypothesis) for the metrics: permutation and monotone-transform invariance,
swap symmetry, ties, tiny and huge sets."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from normscore import metrics

# multiples of 1/64 up to +-1.6e4: exact in float64, so monotone maps stay strictly monotone
finite = st.integers(min_value=-(10**6), max_value=10**6).map(lambda v: v / 64.0)
# small integer-valued floats make ties frequent
tied = st.integers(min_value=-3, max_value=3).map(float)
scores = st.one_of(
    arrays(np.float64, st.integers(1, 60), elements=finite),
    arrays(np.float64, st.integers(1, 60), elements=tied),
)
KEYS = tuple(metrics.METRICS)


def _close(a: dict, b: dict, keys=KEYS) -> None:
    for k in keys:
        assert abs(a[k] - b[k]) < 1e-9, (k, a[k], b[k])


@settings(max_examples=150, deadline=None)
@given(scores, scores, st.randoms(use_true_random=False))
def test_invariant_to_permutations(id_s, ood_s, rnd):
    base = metrics.evaluate(id_s, ood_s)
    p, q = list(id_s), list(ood_s)
    rnd.shuffle(p)
    rnd.shuffle(q)
    _close(base, metrics.evaluate(np.array(p), np.array(q)))


@settings(max_examples=150, deadline=None)
@given(scores, scores, st.sampled_from(["affine", "cube", "exp_scaled", "rank"]))
def test_invariant_to_strictly_increasing_transforms(id_s, ood_s, kind):
    allv = np.r_[id_s, ood_s]

    def f(v):
        if kind == "affine":
            return 3.0 * v + 7.0
        if kind == "cube":
            return np.cbrt(v)  # strictly increasing, compresses large values
        if kind == "exp_scaled":
            return np.exp((v - allv.max()) / (np.ptp(allv) + 1.0))
        uniq = np.unique(allv)
        return np.searchsorted(uniq, v).astype(float)  # dense rank keeps order and ties

    _close(metrics.evaluate(id_s, ood_s), metrics.evaluate(f(id_s), f(ood_s)))


@settings(max_examples=150, deadline=None)
@given(scores, scores)
def test_swap_symmetry(id_s, ood_s):
    a = metrics.evaluate(id_s, ood_s)
    b = metrics.evaluate(-ood_s, -id_s)  # roles and signs swapped
    assert abs(a["auroc"] - b["auroc"]) < 1e-9
    # swapping roles and signs exchanges the ID- and OOD-positive conventions
    assert abs(a["aupr_in"] - b["aupr_out"]) < 1e-9 and abs(a["aupr_out"] - b["aupr_in"]) < 1e-9
    assert abs(a["aupr_in_trapz"] - b["aupr_out_trapz"]) < 1e-9
    assert abs(a["aupr_out_trapz"] - b["aupr_in_trapz"]) < 1e-9
    assert abs(a["fpr95"] - b["fpr95_oodpos"]) < 1e-9 and abs(a["fpr95_oodpos"] - b["fpr95"]) < 1e-9
    assert abs(a["detection_error"] - b["detection_error"]) < 1e-9
    c = metrics.evaluate(ood_s, id_s)  # roles swapped, signs kept: AUROC complements
    assert abs(a["auroc"] + c["auroc"] - 1.0) < 1e-9


@settings(max_examples=100, deadline=None)
@given(scores, scores)
def test_ranges_and_ties(id_s, ood_s):
    m = metrics.evaluate(id_s, ood_s)
    for k in KEYS:
        assert 0.0 <= m[k] <= 1.0
    const = metrics.evaluate(np.zeros_like(id_s), np.zeros_like(ood_s))
    assert const["auroc"] == 0.5 and const["fpr95"] == 1.0 and const["fpr95_oodpos"] == 1.0


def test_tiny_sets():
    assert metrics.evaluate([1.0], [0.0])["auroc"] == 1.0
    assert metrics.evaluate([0.0], [1.0])["fpr95"] == 1.0
    assert metrics.evaluate([0.0], [0.0])["auroc"] == 0.5


def test_huge_sets_are_exact_and_fast():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, 2_000_000).astype(float)  # many ties
    b = rng.integers(0, 900, 1_000_000).astype(float)
    m = metrics.evaluate(a, b)
    # exact AUROC by counting over the 1,000 distinct values
    ca, cb = np.bincount(a.astype(int), minlength=1000), np.bincount(b.astype(int), minlength=1000)
    below_b = np.cumsum(cb) - cb
    exact = (np.sum(ca * below_b) + 0.5 * np.sum(ca * cb)) / (a.size * b.size)
    assert abs(m["auroc"] - exact) < 1e-12
