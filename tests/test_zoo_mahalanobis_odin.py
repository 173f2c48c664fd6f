"""mahalanobis_odin: parity with pytorch-ood 0.4 ``MahalanobisODIN`` (same model, data and
``eps``), the perturbation against a float64 autograd reference, and model hygiene.

Conventions: pytorch-ood returns ``0.5 min_c d^2`` with a covariance without the ``1/N`` (higher =
OOD); ours is ``-min_c d^2`` (higher = ID), so the ranking is the same. pytorch-ood takes
``torch.sign`` of the input gradient (zero stays zero); we follow the official code and OpenOOD
(a zero gradient counts as positive), which can move a few pixels differently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN, assert_unchanged, make_loader, snapshot
from scipy.stats import spearmanr

import normscore
from normscore.taps import CaptureSpec

N = 400


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=4)
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 16, 16))
    m.eval()
    loader = make_loader(n=N, batch=32, classes=4, seed=2)
    x = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 1.3
    return m, loader, x


def _penultimate(m, x):
    return normscore.capture(normscore.get_adapter(m), x, CaptureSpec(logits=False, penultimate=True))["penultimate"]


@pytest.mark.parametrize("eps", [0.002, 0.05])
def test_matches_pytorch_ood_mahalanobis_odin(cnn, eps):
    from pytorch_ood.detector import MahalanobisODIN as Pood

    m, loader, x = cnn
    det = normscore.create("mahalanobis_odin", noise=eps).fit(m, loader, calibration=0.0)
    z = torch.cat([_penultimate(m, xb) for xb, _ in loader])
    y = torch.cat([yb for _, yb in loader])
    ref = Pood(m.features, eps=eps).fit_features(z, y)
    theirs = ref.predict(x.clone()).detach().double().numpy()
    m.zero_grad(set_to_none=True)  # pytorch-ood's predict calls loss.backward() on the model
    ours = det.score(x).double().numpy()
    rho = spearmanr(ours, -theirs).statistic
    assert rho >= 0.999, rho
    # the step moved the scores: not plain Mahalanobis
    plain = normscore.create("mahalanobis").fit(m, loader, calibration=0.0).score(x).double().numpy()
    assert np.abs(plain - ours).max() > 1e-3


def test_perturbation_equals_a_float64_autograd_reference(cnn):
    m, loader, x = cnn
    det = normscore.create("mahalanobis_odin", noise=0.01).fit(m, loader, calibration=0.0)
    m64 = TinyCNN(num_classes=4).double()
    m64.load_state_dict(m.state_dict())
    m64.eval()
    xin = x.double().clone().requires_grad_(True)
    h = m64.features(xin)
    vals, vecs = det.cov_eigvals_, det.cov_eigvecs_
    prec = vecs @ torch.diag(1.0 / vals) @ vecs.T
    mu = det.class_means_
    diff = h[:, None, :] - mu[None]
    d2 = torch.einsum("bcd,de,bce->bc", diff, prec, diff)
    c = d2.detach().argmin(1)
    loss = 0.5 * d2.gather(1, c[:, None]).sum()
    (g,) = torch.autograd.grad(loss, xin)
    expected = x - 0.01 * torch.where(g >= 0, 1.0, -1.0).float()
    torch.testing.assert_close(det.perturb(x), expected)


def test_leaves_the_model_untouched_also_in_train_mode(cnn):
    m, loader, x = cnn
    det = normscore.create("mahalanobis_odin").fit(m, loader)
    m.train()
    try:
        snap = snapshot(m)
        s1 = det.score(x)
        assert_unchanged(m, snap)
    finally:
        m.eval()
    torch.testing.assert_close(det.score(x), s1)
    # noise = 0 is plain Mahalanobis
    zero = normscore.create("mahalanobis_odin", noise=0.0).fit(m, loader, calibration=0.0)
    plain = normscore.create("mahalanobis").fit(m, loader, calibration=0.0)
    torch.testing.assert_close(zero.score(x), plain.score(x))
    assert normscore.detector_info("mahalanobis_odin")["needs_gradients"]
