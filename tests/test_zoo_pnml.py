"""pNML against pytorch-ood 0.4 ``PNML`` (the same formula as the official kobybibas code:
``probs_normalized`` = softmax of the head on L2-normalised features, ``(X^T X)^{-1}`` of the
normalised fit features). Ours is ``-regret``; pytorch-ood's score is the regret."""

from __future__ import annotations

import numpy as np
import scipy.stats as st
import torch
from zoo_helpers import FeatNet, features_of, fitted, gaussians

D, C = 12, 4


def test_pnml_matches_pytorch_ood():
    from pytorch_ood.detector import PNML

    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(600, D, C, seed=1)
    xt, _ = gaussians(100, D, C, seed=2, sep=4.0)
    fit, test = features_of(model, x, y), features_of(model, xt)
    ours = fitted("pnml", model, fit).score_features(test).double().numpy()
    ref = PNML(None, lambda z: model.fc(z)).fit_features(fit["penultimate"], y).predict_features(test["penultimate"])
    ref = ref.double().numpy()
    assert st.spearmanr(ours, -ref)[0] >= 0.999
    np.testing.assert_allclose(ours, -ref, atol=1e-5)


def test_pnml_matches_a_float64_reference_and_stays_finite_for_saturated_softmax():
    """Large logits (p underflows to 0 in float32): the official formula in float64 numpy."""
    model = FeatNet(D, C, relu=False).eval()
    with torch.no_grad():
        model.fc.weight.mul_(200.0)
    x, y = gaussians(300, D, C, seed=4)
    xt, _ = gaussians(40, D, C, seed=5)
    fit, test = features_of(model, x, y), features_of(model, xt)
    s = fitted("pnml", model, fit).score_features(test)
    assert torch.isfinite(s).all()
    h = fit["penultimate"].double().numpy()
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    inv = np.linalg.inv(h.T @ h)
    q = test["penultimate"].double().numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, b = model.fc.weight.double().detach().numpy(), model.fc.bias.double().detach().numpy()
    logit = q @ w.T + b
    logp = (
        logit - np.log(np.exp(logit - logit.max(1, keepdims=True)).sum(1, keepdims=True)) - logit.max(1, keepdims=True)
    )
    p = np.exp(logp)
    xp = np.einsum("bi,ij,bj->b", q, inv, q)
    g = xp / (1 + xp)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = p / (p + (1 - p) * np.exp(g[:, None] * logp))
    terms = np.where(p > 0, terms, 0.0)  # the limit p -> 0 of each term
    ref = -np.log(terms.sum(1)) / np.log(C)
    np.testing.assert_allclose(s.double().numpy(), ref, rtol=1e-5, atol=1e-6)
