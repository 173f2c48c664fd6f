"""NECO against the official code's formula (MouinBenAmmar/NECO, ``neco`` in test_all_ood.py),
recomputed with sklearn's ``StandardScaler`` and ``PCA`` in float64 on the same features.
pytorch-ood 0.4 has no NECO. Compared: the ratio ``||PCA_d(x)|| / ||x||`` with and without the
scaler (the official ResNet path and its "no scaler" hint), and the product with the max logit
(the official path for non-ResNet models). Same sign convention (higher = ID) as the official code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

import normscore
from normscore.errors import ConfigError


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=10, width=16)
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 16, 16))
    m.eval()
    g = torch.Generator().manual_seed(1)
    xf = torch.randn(400, 3, 16, 16, generator=g)
    xt = torch.randn(120, 3, 16, 16, generator=g) * 1.5
    loader = [xf[i : i + 50] for i in range(0, 400, 50)]
    with torch.no_grad():
        hf = m.features(xf).double().numpy()
        ht = m.features(xt).double().numpy()
        zt = m(xt).double().numpy()
    return m, loader, xt, hf, ht, zt


def _official(hf, ht, zt, dim, scaler, maxlogit):
    if scaler:
        ss = StandardScaler()
        train, test = ss.fit_transform(hf), None
        test = ss.transform(ht)
    else:
        train, test = hf, ht
    pca = PCA(hf.shape[1]).fit(train)
    red = pca.transform(test)[:, :dim]
    score = np.linalg.norm(red, axis=1) / np.linalg.norm(test, axis=1)
    return score * zt.max(-1) if maxlogit else score


@pytest.mark.parametrize(
    ("dim", "standardize", "maxlogit"), [(9, True, False), (5, True, True), (12, False, False), (0.25, True, False)]
)
def test_neco_matches_the_official_formula(setup, dim, standardize, maxlogit):
    model, loader, xt, hf, ht, zt = setup
    det = normscore.create("neco", dim=dim, standardize=standardize, maxlogit=maxlogit)
    det.fit(model, loader, calibration=0.0)
    d = dim if isinstance(dim, int) else round(dim * hf.shape[1])
    ref = _official(hf, ht, zt, d, standardize, maxlogit)
    np.testing.assert_allclose(det.score(xt).double().numpy(), ref, rtol=2e-5, atol=1e-6)


def test_neco_default_dim_is_classes_minus_one_and_dim_needs_no_refit(setup):
    model, loader, xt, hf, ht, zt = setup
    det = normscore.create("neco").fit(model, loader, calibration=0.0)
    assert det.principal_dim(32) == 9
    np.testing.assert_allclose(det.score(xt).double().numpy(), _official(hf, ht, zt, 9, True, False), rtol=2e-5)
    a = det.set_params(dim=4).score(xt)
    assert torch.equal(a, normscore.create("neco", dim=4).fit(model, loader, calibration=0.0).score(xt))


def test_neco_standardize_is_fixed_at_fit_time(setup):
    model, loader, xt, *_ = setup
    det = normscore.create("neco").fit(model, loader, calibration=0.0)
    det.set_params(standardize=False)
    with pytest.raises(ConfigError, match="Refit"):
        det.score(xt)
    with pytest.raises(ConfigError, match="must not exceed"):
        det.set_params(standardize=True, dim=33).score(xt)
