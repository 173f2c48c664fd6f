"""multi_mahalanobis: parity with pytorch-ood 0.4 ``MultiMahalanobis`` on the same per-layer
features (the spatial means of the TinyCNN's two candidate blocks), and a float64 closed form.

Conventions: pytorch-ood's per-layer outlier score is ``0.5 min_c d^2`` with a covariance that is
the within-class scatter *without* the ``1/N`` (plus a 1e-6 ridge), so its score is
``-(ours) / (2 N)`` for uniform weights (ours: higher = more ID, covariance = scatter / N)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN, make_loader
from scipy.stats import spearmanr
from torch import nn

import normscore
from normscore.errors import AdapterError, ConfigError
from normscore.taps import CaptureSpec, block_key

N = 480


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=4)
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 16, 16))
    m.eval()
    loader = make_loader(n=N, batch=32, classes=4, seed=2)
    x = torch.randn(50, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 1.3
    return m, loader, x


def _pood_layers(m: TinyCNN) -> list[nn.Module]:
    # consecutive layers as pytorch-ood expects: layer i runs on the output of layers < i
    return [m.features[:3], m.features[3:7]]


def test_matches_pytorch_ood_multi_mahalanobis(cnn):
    from pytorch_ood.detector import MultiMahalanobis as Pood

    m, loader, x = cnn
    det = normscore.create("multi_mahalanobis").fit(m, loader, calibration=0.0)
    assert det.layers_ == ["features.2", "features.6"]
    layers = _pood_layers(m)
    with torch.no_grad():
        z1 = torch.cat([layers[0](xb) for xb, _ in loader])
        z2 = layers[1](z1)
    y = torch.cat([yb for _, yb in loader])
    ref = Pood(layers).fit_structured([z1.mean((2, 3)), z2.mean((2, 3))], y)
    with torch.no_grad():
        theirs = ref.predict(x).double().numpy()
    ours = det.score(x).double().numpy()
    rho = spearmanr(ours, -theirs).statistic
    assert rho >= 0.999, rho
    np.testing.assert_allclose(ours, -2 * N * theirs, rtol=2e-3)


def test_weights_and_layers(cnn):
    m, loader, x = cnn
    both = normscore.create("multi_mahalanobis").fit(m, loader, calibration=0.0)
    d2 = both.layer_sq_distances(
        normscore.capture(both.adapter, x, CaptureSpec(logits=False, blocks=frozenset({("*", "gap")})))
    )
    w = normscore.create("multi_mahalanobis", weights=[0.3, 2.0]).fit(m, loader, calibration=0.0)
    torch.testing.assert_close(w.score(x).double(), -(0.3 * d2[:, 0] + 2.0 * d2[:, 1]), rtol=1e-5, atol=1e-4)
    one = normscore.create("multi_mahalanobis", layers=["features.6"]).fit(m, loader, calibration=0.0)
    assert one.capture_spec(one.adapter, "score").blocks == frozenset({("features.6", "gap")})
    torch.testing.assert_close(one.score(x).double(), -d2[:, 1], rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="one weight per layer"):
        normscore.create("multi_mahalanobis", weights=[1.0]).fit(m, loader)
    with pytest.raises(AdapterError):
        normscore.create("multi_mahalanobis", layers=["nope"]).fit(m, loader)
    with pytest.raises(ConfigError):
        normscore.create("multi_mahalanobis", layers=[])


def test_single_layer_equals_a_float64_closed_form(cnn):
    m, loader, x = cnn
    det = normscore.create("multi_mahalanobis", layers=["features.2"]).fit(m, loader, calibration=0.0)
    spec = CaptureSpec(logits=False, blocks=frozenset({("features.2", "gap")}))
    key = block_key("features.2", "gap")
    f = torch.cat([normscore.capture(det.adapter, xb, spec)[key] for xb, _ in loader]).double().numpy()
    y = torch.cat([yb for _, yb in loader]).numpy()
    q = normscore.capture(det.adapter, x, spec)[key].double().numpy()
    means = np.stack([f[y == c].mean(0) for c in range(4)])
    cen = f - means[y]
    prec = np.linalg.inv(cen.T @ cen / len(f))
    d2 = np.stack([np.einsum("bi,ij,bj->b", q - mu, prec, q - mu) for mu in means], 1)
    np.testing.assert_allclose(det.score(x).double().numpy(), -d2.min(1), rtol=1e-5)
