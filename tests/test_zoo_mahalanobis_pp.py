"""Mahalanobis++ / RMDS++ against an independent float64 numpy computation of the official code's
formula (github mueller-mp/maha-norm, ``mdsn_postprocessor.py`` / ``rmdsn_postprocessor.py``):
features divided by their L2 norm before the fit and before scoring, class means, the shared
covariance of the class-centred features inverted with scikit-learn's ``EmpiricalCovariance``
(``pinvh``), score ``max_c -(u - mu_c)^T P (u - mu_c)`` (RMDS++: minus the background term).
Same sign convention as ours (higher = more ID); the official code works in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo_helpers import FeatNet, features_of, fitted, gaussians

D, C, N = 12, 4, 600


@pytest.fixture(scope="module")
def setup():
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(N, D, C, seed=1)
    xt, _ = gaussians(60, D, C, seed=2, sep=4.0)
    # strongly varying norms: the case the method is about
    x = x * torch.linspace(0.2, 5.0, N)[:, None, None, None]
    xt = xt * torch.linspace(0.3, 4.0, 60)[:, None, None, None]
    return model, features_of(model, x, y), features_of(model, xt)


def _official(h: np.ndarray, y: np.ndarray, q: np.ndarray, relative: bool) -> np.ndarray:
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    classes = np.unique(y)
    means = np.stack([h[y == c].mean(0) for c in classes])
    centred = np.concatenate([h[y == c] - means[i] for i, c in enumerate(classes)])
    centred = centred - centred.mean(0)  # EmpiricalCovariance(assume_centered=False)
    prec = np.linalg.pinv(centred.T @ centred / len(centred), hermitian=True)
    scores = np.stack([-np.einsum("bi,ij,bj->b", q - m, prec, q - m) for m in means], 1)
    if relative:
        w = h.mean(0)
        hc = h - w
        wprec = np.linalg.pinv(hc.T @ hc / len(hc), hermitian=True)
        bg = -np.einsum("bi,ij,bj->b", q - w, wprec, q - w)
        scores = scores - bg[:, None]
    return scores.max(1)


@pytest.mark.parametrize("name,relative", [("mahalanobis_pp", False), ("rmds_pp", True)])
def test_equals_the_official_formula(name, relative, setup):
    model, fit, test = setup
    det = fitted(name, model, fit)
    ref = _official(
        fit["penultimate"].double().numpy(), fit["labels"].numpy(), test["penultimate"].double().numpy(), relative
    )
    got = det.score_features(test).double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("name,base", [("mahalanobis_pp", "mahalanobis"), ("rmds_pp", "rmds")])
def test_scale_invariant_per_sample_and_differs_from_the_plain_score(name, base, setup):
    model, fit, test = setup
    det = fitted(name, model, fit)
    scaled = dict(test)
    scaled["penultimate"] = test["penultimate"] * torch.linspace(0.1, 10.0, 60)[:, None]
    from normscore.taps import Features

    torch.testing.assert_close(det.score_features(Features(scaled)), det.score_features(test), rtol=1e-5, atol=1e-5)
    plain = fitted(base, model, fit).score_features(test)
    assert not torch.allclose(plain, det.score_features(test), rtol=1e-2)


def test_shrinkage_is_inherited(setup):
    model, fit, test = setup
    a = fitted("mahalanobis_pp", model, fit).score_features(test)
    b = fitted("mahalanobis_pp", model, fit, shrinkage=0.1).score_features(test)
    assert not torch.allclose(a, b)
