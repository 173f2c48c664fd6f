"""VRA against pytorch-ood 0.4's ``VRA`` (element-wise thresholds, the default variant) and
OpenOOD's ``vra_postprocessor`` (one global threshold pair, ``variant="openood"``).

pytorch-ood parity: the same TinyCNN, its ``backbone`` = ``model.features`` (the pooled 64-d
features, so its per-element thresholds are per unit, as normscore's), ``head`` = ``model.fc``,
the same fit and test images and percentiles (fractions there, percent here). pytorch-ood
returns ``-energy`` (higher = OOD), normscore ``energy``. OpenOOD: its formula recomputed in
numpy float64 (``np.percentile`` of all ID activation values, ``clip``, ``logsumexp``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN
from scipy.stats import spearmanr

import normscore
from normscore.errors import ConfigError


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=10, width=32)
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 16, 16))
    m.eval()
    g = torch.Generator().manual_seed(1)
    xf = torch.randn(300, 3, 16, 16, generator=g)
    yf = torch.randint(0, 10, (300,), generator=g)
    xt = torch.randn(120, 3, 16, 16, generator=g) * 1.5
    loader = [(xf[i : i + 64], yf[i : i + 64]) for i in range(0, 300, 64)]
    return m, xf, yf, xt, loader


@pytest.mark.parametrize(("lo", "hi"), [(1.0, 99.0), (5.0, 90.0)])
def test_vra_matches_pytorch_ood(setup, lo, hi):
    from pytorch_ood.detector import VRA as PoodVRA

    model, xf, yf, xt, loader = setup
    ours = normscore.create("vra", lower_percentile=lo, upper_percentile=hi).fit(model, loader, calibration=0.0)
    pood = PoodVRA(model.features, model.fc, lower_percentile=lo / 100, upper_percentile=hi / 100)
    with torch.no_grad():
        pood.fit_feature_maps(model.features(xf), yf)
        theirs = pood.predict_feature_maps(model.features(xt))
    # the thresholds themselves
    tlo, thi = ours.thresholds()
    assert torch.allclose(tlo, pood._lower_threshold, atol=1e-5) and torch.allclose(
        thi, pood._upper_threshold, atol=1e-5
    )
    s = ours.score(xt)
    rho = spearmanr(s.numpy(), -theirs.numpy()).statistic
    assert rho >= 0.999, rho
    assert torch.allclose(s, -theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("lo", "hi"), [(None, None), (5.0, 95.0)])
def test_vra_openood_variant_matches_the_openood_formula_in_float64(setup, lo, hi):
    model, xf, _yf, xt, loader = setup
    det = normscore.create("vra", variant="openood", lower_percentile=lo, upper_percentile=hi)
    det.fit(model, loader, calibration=0.0)
    plo, phi = (10.0, 90.0) if lo is None else (lo, hi)
    with torch.no_grad():
        acts = model.features(xf).double().numpy()
        h = model.features(xt).double().numpy()
    tl, th = np.percentile(acts.flatten(), plo), np.percentile(acts.flatten(), phi)
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    z = np.clip(h, tl, th) @ w.T + b
    ref = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    np.testing.assert_allclose(det.score(xt).double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_vra_variants_differ_and_switch_without_refit(setup):
    model, _xf, _yf, xt, loader = setup
    det = normscore.create("vra").fit(model, loader, calibration=0.0)
    a = det.score(xt)
    b = det.set_params(variant="openood").score(xt)
    assert not torch.allclose(a, b)
    fresh = normscore.create("vra", variant="openood").fit(model, loader, calibration=0.0).score(xt)
    assert torch.equal(b, fresh)
    lo, hi = det.thresholds()
    assert lo.ndim == 0 and hi.ndim == 0


def test_vra_rejects_crossed_percentiles():
    with pytest.raises(ConfigError, match="must not exceed"):
        normscore.create("vra", lower_percentile=95, upper_percentile=90)
    with pytest.raises(ConfigError, match="must not exceed"):
        normscore.create("vra", variant="openood", lower_percentile=95)  # upper defaults to 90
