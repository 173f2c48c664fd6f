"""OpenMax against pytorch-ood 0.4 ``OpenMax`` (parity) and its own Weibull fit against scipy.

Compared: the same logits (FeatNet head = a nearest-class-mean classifier, so every class is
some test sample's argmax), the same tail size / alpha; ours is ``-P(unknown)``, theirs
``P(unknown)``. Both variants: ``openood`` is pytorch-ood fed only the correctly classified fit
samples with tail 20 / alpha 3 (OpenOOD's postprocessor needs libmr and CUDA, so it is not run).
The remaining difference (max |diff| ~1e-4) is the Weibull fit: ours is the exact maximum
likelihood, pytorch-ood's ``exponweib.fit`` a Nelder-Mead search (checked: our log-likelihood is
never lower).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch
from zoo_helpers import FeatNet, features_of, fitted, gaussians

from normscore.detectors.openmax import TRANSLATION, weibull_fit_high
from normscore.errors import ConfigError, InputError

D, C = 12, 4


@pytest.fixture(scope="module")
def setup():
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(600, D, C, seed=1, sep=1.0)
    xt, _ = gaussians(200, D, C, seed=2, sep=2.0)
    h = x.flatten(1)
    mu = torch.stack([h[y == c].mean(0) for c in range(C)])
    with torch.no_grad():
        model.fc.weight.copy_(0.3 * mu)
        model.fc.bias.copy_(-0.15 * (mu * mu).sum(1))
    fit, test = features_of(model, x, y), features_of(model, xt)
    assert set(test["logits"].argmax(1).tolist()) == set(range(C))  # see pytorch-ood's batch bug
    return model, fit, test, y


@pytest.mark.parametrize("hp", [{}, {"alpha": 2}, {"tailsize": 10}, {"variant": "openood"}])
def test_openmax_matches_pytorch_ood(setup, hp):
    from pytorch_ood.detector import OpenMax

    model, fit, test, y = setup
    det = fitted("openmax", model, fit, **hp)
    ours = det.score_features(test).double().numpy()
    z, yy = fit["logits"], y
    if hp.get("variant") == "openood":
        assert (det.tail, det.ranks) == (20, 3)
        ok = z.argmax(1) == y
        z, yy = z[ok], y[ok]
    ref = OpenMax(None, tailsize=det.tail, alpha=det.ranks).fit_logits(z, yy).predict_logits(test["logits"]).numpy()
    assert st.spearmanr(ours, -ref)[0] >= 0.999
    np.testing.assert_allclose(ours, -ref, atol=5e-4)


def test_weibull_fit_is_the_maximum_likelihood():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 30.0):
        tail = scale * torch.rand(25, generator=g, dtype=torch.float64) + 3.0
        k, lam, small = weibull_fit_high(tail)
        x = (tail + TRANSLATION - small).numpy()
        ll = st.weibull_min.logpdf(x, k, scale=lam).sum()
        c2, _, s2 = st.weibull_min.fit(x, floc=0)
        assert ll >= st.weibull_min.logpdf(x, c2, scale=s2).sum() - 1e-6
        # the score equation holds
        lx = np.log(x)
        w = np.exp(k * (lx - lx.max()))
        assert abs(1 / k + lx.mean() - (w * lx).sum() / w.sum()) < 1e-9 * max(1.0, 1 / k)


def test_openmax_changing_the_tail_needs_a_refit(setup):
    model, fit, test, _ = setup
    det = fitted("openmax", model, fit)
    det.set_params(tailsize=5)
    with pytest.raises(ConfigError, match="Refit"):
        det.score_features(test)


def test_openmax_openood_variant_without_correct_samples_says_so():
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(40, D, C, seed=3)
    f = features_of(model, x, y)
    f["labels"] = (f["logits"].argmax(1) + 1) % C  # nothing classified correctly
    with pytest.raises(InputError, match="correctly classified"):
        fitted("openmax", model, f, variant="openood")


def test_openmax_per_class_sample_is_exact_below_its_capacity(setup, monkeypatch):
    """With a per-class capacity below the class sizes the tail comes from a sample; above it, the
    fit equals the full one (and neither depends on the batch size)."""
    import normscore.detectors.openmax as om

    model, fit, test, _ = setup
    full = fitted("openmax", model, fit).score_features(test)
    monkeypatch.setattr(om, "OPENMAX_VALUES", 16 * 40)  # 40 rows per class of 4 classes
    small = fitted("openmax", model, fit).score_features(test)
    assert not torch.equal(full, small)
    det = om.OpenMax().attach(model)
    det.fit_features([fit.select(torch.arange(i, min(i + 7, 600))) for i in range(0, 600, 7)], calibration=0.0)
    assert torch.equal(det.score_features(test), small)
