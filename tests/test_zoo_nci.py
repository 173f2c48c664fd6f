"""NCI against pytorch-ood 0.4's ``NCI`` and OpenOOD's ``nci_postprocessor`` formula.

Parity: the same TinyCNN (encoder = ``model.features``, pooled 64-d features; head =
``model.fc``), the same fit images (``mu`` = their mean feature) and test images, the same
``alpha``. pytorch-ood returns ``-score`` (higher = OOD), normscore ``score``. OpenOOD's
formula is recomputed in numpy float64 from its postprocessor (``w[argmax] . (h - mu) /
||h - mu|| + alpha ||h||_1``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, TensorDataset

import normscore


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
    return m, xf, yf, xt


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_nci_matches_pytorch_ood(setup, alpha):
    from pytorch_ood.detector import NCI as PoodNCI

    model, xf, yf, xt = setup
    loader = DataLoader(TensorDataset(xf, yf), batch_size=50)
    ours = normscore.create("nci", alpha=alpha).fit(model, loader, calibration=0.0).score(xt)
    pood = PoodNCI(model.features, model.fc, alpha=alpha)
    with torch.no_grad():
        pood.fit_features(model.features(xf))
        theirs = pood.predict_features(model.features(xt))
    rho = spearmanr(ours.numpy(), -theirs.numpy()).statistic
    assert rho >= 0.999, rho
    assert torch.allclose(ours, -theirs, rtol=1e-4, atol=1e-5)


def test_nci_matches_the_openood_formula_in_float64(setup):
    model, xf, yf, xt = setup
    alpha = 0.001
    with torch.no_grad():
        hf = model.features(xf).double().numpy()
        h = model.features(xt).double().numpy()
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    mu = hf.mean(0)
    pred = (h @ w.T + b).argmax(1)
    ref = np.sum(w[pred] * (h - mu), 1) / np.linalg.norm(h - mu, axis=1) + alpha * np.abs(h).sum(1)
    loader = [(xf[i : i + 64], yf[i : i + 64]) for i in range(0, 300, 64)]
    ours = normscore.create("nci", alpha=alpha).fit(model, loader, calibration=0.0).score(xt).double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_nci_alpha_needs_no_refit(setup):
    model, xf, yf, xt = setup
    loader = [(xf, yf)]
    det = normscore.create("nci").fit(model, loader, calibration=0.0)
    a = det.set_params(alpha=0.1).score(xt)
    b = normscore.create("nci", alpha=0.1).fit(model, loader, calibration=0.0).score(xt)
    assert torch.equal(a, b)
