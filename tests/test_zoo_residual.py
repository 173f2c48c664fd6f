"""Residual (ViM's residual alone) against an independent float64 numpy computation of OpenOOD's
``residual_postprocessor.py``: ``u = -pinv(W) b``, ``EmpiricalCovariance(assume_centered=True)``
of ``h - u``, the eigenvectors beyond the ``dim`` largest eigenvalues, score ``-|(h - u) NS|``.
Same sign as OpenOOD (higher = more ID). pytorch-ood 0.4 has ViM but no residual-only detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo_helpers import FeatNet, features_of, fitted, gaussians

D, C, N = 12, 4, 500


@pytest.fixture(scope="module")
def setup():
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(N, D, C, seed=1)
    xt, _ = gaussians(40, D, C, seed=2, sep=4.0)
    return model, features_of(model, x, y), features_of(model, xt)


def _openood(h, q, w, b, dim):
    u = -np.linalg.pinv(w) @ b
    cov = (h - u).T @ (h - u) / len(h)
    vals, vecs = np.linalg.eigh(cov)
    ns = vecs[:, np.argsort(-vals)[dim:]]
    return -np.linalg.norm((q - u) @ ns, axis=1)


@pytest.mark.parametrize("dim", [None, 3, 9])
def test_equals_openood_formula(dim, setup):
    model, fit, test = setup
    det = fitted("residual", model, fit, dim=dim)
    w = model.fc.weight.detach().double().numpy()
    b = model.fc.bias.detach().double().numpy()
    k = D // 2 if dim is None else dim
    ref = _openood(fit["penultimate"].double().numpy(), test["penultimate"].double().numpy(), w, b, k)
    got = det.score_features(test).double().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_is_vims_residual_and_needs_only_penultimate(setup):
    model, fit, test = setup
    res = fitted("residual", model, fit, dim=5)
    vim = fitted("vim", model, fit, dim=5)
    torch.testing.assert_close(res.score_features(test), (-vim.residual(test["penultimate"])).float())
    spec = res.capture_spec(res.adapter, "score")
    assert spec.penultimate and not spec.logits
    from normscore.taps import Features

    only_h = Features(penultimate=test["penultimate"])
    torch.testing.assert_close(res.score_features(only_h), res.score_features(test))
