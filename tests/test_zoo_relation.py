"""Relation against an independent float64 reference of OpenOOD's ``relation_postprocessor.py``
(``normalize``, ``kernel`` = clamp(feat . feat_t, 0) * (prob . prob_t), edges ``|r| > 0.03``,
``sign(r) |r|^pow`` summed over the whole training bank); pytorch-ood has no relation detector."""

from __future__ import annotations

import numpy as np
import pytest
from zoo_helpers import FeatNet, features_of, fitted, gaussians

from normscore.errors import ConfigError

D, C = 12, 4


def _reference(fit, test, pw, thres=0.03):
    def norm(h):
        return h / np.sqrt((h**2).sum(-1) + 1e-10)[:, None]

    def soft(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    f, ft = norm(test["penultimate"].double().numpy()), norm(fit["penultimate"].double().numpy())
    p, pt = soft(test["logits"].double().numpy()), soft(fit["logits"].double().numpy())
    rel = np.clip(f @ ft.T, 0, None) * (p @ pt.T)
    rel = (np.abs(rel) > thres) * rel
    return (np.sign(rel) * np.abs(rel) ** pw).sum(-1)


@pytest.mark.parametrize("pw", [1, 2, 4])
def test_relation_matches_the_openood_formula(pw):
    model = FeatNet(D, C, relu=True).eval()
    x, y = gaussians(500, D, C, seed=1, offset=0.5)
    xt, _ = gaussians(60, D, C, seed=2, sep=4.0)
    fit, test = features_of(model, x, y), features_of(model, xt)
    det = fitted("relation", model, fit, pow=pw)
    np.testing.assert_allclose(det.score_features(test).double().numpy(), _reference(fit, test, pw), rtol=1e-4)


def test_relation_bank_subsample_and_refit_rule():
    model = FeatNet(D, C).eval()
    x, y = gaussians(400, D, C, seed=3)
    fit = features_of(model, x, y)
    det = fitted("relation", model, fit, alpha=0.25)
    assert 50 < det.bank_.shape[0] < 150
    det.set_params(alpha=1.0)
    with pytest.raises(ConfigError, match="Refit"):
        det.score_features(fit)
