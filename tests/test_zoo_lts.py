"""LTS against pytorch-ood 0.4's ``LTS`` and the official code's formula.

Parity: the same TinyCNN (encoder = ``model.features``, the pooled 64-d features; head =
``model.fc``), the same images, pytorch-ood ``p = 1 - percentile/100``. pytorch-ood returns
``-logsumexp`` (higher = OOD); normscore returns ``logsumexp`` (higher = ID), so the scores are
compared as ``ours == -theirs``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN
from scipy.stats import spearmanr

import normscore


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=10, width=32)
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 16, 16))
    return m.eval()


@pytest.mark.parametrize("percentile", [95.0, 65.0, 85.0])
def test_lts_matches_pytorch_ood(model, percentile):
    from pytorch_ood.detector import LTS as PoodLTS

    x = torch.randn(200, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    det = normscore.create("lts", percentile=percentile).attach(model)
    ours = det.score(x)
    theirs = PoodLTS(model.features, model.fc, p=round(1 - percentile / 100, 10)).predict(x)
    rho = spearmanr(ours.numpy(), -theirs.numpy()).statistic
    assert rho >= 0.999, rho
    assert torch.allclose(ours, -theirs, rtol=1e-5, atol=1e-5), (ours + theirs).abs().max()


def test_lts_matches_the_official_formula_in_float64(model):
    """The official ``lts(x, percentile)`` (andrijazz/lts), in numpy float64."""
    x = torch.randn(50, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = model.features(x).double().numpy()
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    p = 85
    r = np.maximum(h, 0)
    n = r.shape[1]
    k = n - int(np.round(n * p / 100.0))
    s = (r.sum(1) / np.sort(r, axis=1)[:, ::-1][:, :k].sum(1)) ** 2
    z = (h @ w.T + b) * s[:, None]
    ref = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    ours = normscore.create("lts", percentile=p).attach(model).score(x).double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_lts_all_zero_features_are_finite():
    from zoo_helpers import FeatNet

    from normscore.taps import Features

    model = FeatNet(8, 3).eval()
    det = normscore.create("lts").attach(model)
    h = torch.zeros(2, 8)
    z = model.fc(h)
    s = det.score_features(Features(logits=z, penultimate=h))
    assert torch.isfinite(s).all() and torch.allclose(s, torch.full((2,), float(np.log(3.0))))
