"""nac: parity with pytorch-ood 0.4 ``NACUE`` on the same TinyCNN, data, layers (the adapter's
default blocks = the two conv+BN+ReLU stage outputs) and hyperparameters: the fitted histograms
are identical and the scores equal (pytorch-ood returns ``-coverage``, higher = OOD; ours is the
coverage). A float64 reference of the neuron states checks the gradient capture on its own."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, make_loader
from scipy.stats import spearmanr

import normscore
from normscore.detectors.nac import geometric_bins


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=5)
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 3, 16, 16))
        m.fc.weight.mul_(5.0)
    return m.eval()


LOADER = make_loader(n=200, batch=32, classes=5)
X = torch.randn(100, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 1.5


@pytest.mark.parametrize("hp", [{}, {"alpha": 1000.0, "m_bins": 20, "o_star": 10}])
def test_parity_with_pytorch_ood(model, hp):
    from pytorch_ood.detector import NACUE

    det = normscore.create("nac", **hp).fit(model, LOADER, calibration=0.0)
    assert det.blocks_ == ["features.2", "features.6"]
    ref = NACUE(model, layers=[model.features[2], model.features[6]], **hp).fit(LOADER)
    for ours, theirs in zip(det.counts_.split(det.layer_sizes_), ref._stats):
        assert torch.equal(ours, theirs.counts)  # bins in float32 as theirs (dead neurons sit on an edge)
    a, b = det.score(X), -ref.predict(X)
    assert a.std() > 0
    rho = spearmanr(a.numpy(), b.numpy()).statistic
    assert rho >= 0.999
    assert torch.allclose(a, b, atol=2e-3)


def test_states_equal_a_float64_reference(model):
    """``sigmoid(alpha * mean_pos(z * dKL/dz))`` from a float64 copy of the model and autograd."""
    det = normscore.create("nac").fit(model, LOADER, calibration=0.0)
    feats = det._capture(X[:8], det.blocks_)
    bins = det._states(feats, det.blocks_)
    m64 = TinyCNN(num_classes=5).double()
    m64.load_state_dict(model.state_dict())
    m64.eval()
    f = m64.features
    with torch.enable_grad():
        a = f[0:3](X[:8].double())
        b = f[3:7](a)
        z = m64.fc(f[7:](b))
        loss = -torch.log(torch.softmax(z, 1) + 1e-12).mean(1).sum()
        ga, gb = torch.autograd.grad(loss, [a, b])
    for got, t, g in zip(bins, [a, b], [ga, gb]):
        s = torch.sigmoid(100.0 * (t * g).mean(dim=(2, 3)))
        ref = geometric_bins(s, 50)
        assert (got.cpu() != ref).float().mean() < 0.02  # float32 vs float64 at bin edges


def test_model_in_train_mode_and_fewer_blocks(model):
    det = normscore.create("nac", blocks=["features.6"]).fit(model, LOADER)
    assert det.layer_sizes_ == [16] and det.counts_.shape == (16, 50)
    s = det.score(X)
    assert s.shape == (100,) and bool(((s >= 0) & (s <= 1)).all())
    assert det.decision_ is not None  # calibrated on the held-out samples
