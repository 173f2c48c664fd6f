"""AdaSCALE against an independent re-computation of the official code (sudarshanregmi/AdaSCALE,
``adascale_postprocessor.py`` + ``adascale_net.py``; pytorch-ood has no AdaSCALE): the gradient
of the max logit by autograd on a copy of the model, OpenOOD's ``perturb`` (``topk(largest=
False)``), the ID empirical CDF of ``Q'`` and ``ada_scale`` / energy in numpy float64, with the
paper's k1/k2 assignment (``Q`` over the top-k1, ``C_o`` over the top-k2) at fit and test time.
Same sign: the official ``conf`` is the energy (higher = ID).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import TinyCNN, assert_unchanged, snapshot
from torch import nn

import normscore
from normscore.errors import ConfigError


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=10, width=32)
    m.features[3] = nn.AvgPool2d(2)  # no max-pool: no exactly-zero input gradients (ties in |g|)
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 16, 16))
    m.eval()
    g = torch.Generator().manual_seed(1)
    xf = torch.randn(200, 3, 16, 16, generator=g)
    xt = torch.cat([torch.randn(30, 3, 16, 16, generator=g), 2 * torch.rand(30, 3, 16, 16, generator=g)])
    loader = [xf[i : i + 50] for i in range(0, 200, 50)]
    return m, loader, xf, xt


def _official_feats(model, data, o=0.05, eps=0.5):
    net = copy.deepcopy(model)
    data = data.clone().requires_grad_(True)
    feature = net.features(data)
    output = net.fc(feature)
    labels = output.detach().argmax(dim=1)
    output[torch.arange(len(labels)), labels].backward(torch.ones(len(labels)))
    grad = data.grad.detach()
    b, c, hh, ww = data.shape
    n_pixels = int(c * hh * ww * o)
    abs_grad = grad.abs().view(b, -1)
    _, idx = torch.topk(abs_grad, n_pixels, dim=1, largest=False)
    mask = torch.zeros_like(abs_grad).scatter_(1, idx, 1.0).view(b, c, hh, ww)
    with torch.no_grad():
        fp = net.features(data.detach() + grad.sign() * mask * eps)
    return feature.detach().double().numpy(), fp.double().numpy(), output.detach().double().numpy()


def _qprime(f, fp, k1, k2, lmbda):
    d = f.shape[1]
    k1_, k2_ = max(1, int(d * k1 / 100)), max(1, int(d * k2 / 100))
    order = np.argsort(-f, axis=1, kind="stable")
    co = np.take_along_axis(np.maximum(fp, 0), order[:, :k2_], 1).sum(1)
    q = np.take_along_axis(np.abs(f - fp), order[:, :k1_], 1).sum(1)
    return co + lmbda * q


def _official_scores(model, xf, xt, variant, pmin, pmax, k1=1, k2=5, lmbda=10):
    ff, ffp, _ = _official_feats(model, xf)
    ref = np.sort(_qprime(ff, ffp, k1, k2, lmbda))
    f, fp, z = _official_feats(model, xt)
    ecdf = np.searchsorted(ref, _qprime(f, fp, k1, k2, lmbda), side="right") / ref.size  # statsmodels ECDF
    p = pmin + (1 - ecdf) * (pmax - pmin)
    r = np.maximum(f, 0)
    n = r.shape[1]
    ks = n - np.round(n * p / 100.0).astype(int)
    top = -np.sort(-r, axis=1)
    s = r.sum(1) / np.array([top[i, : ks[i]].sum() for i in range(len(ks))])
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    logits = (f * np.exp(s)[:, None]) @ w.T + b if variant == "a" else z * (s**2)[:, None]
    m = logits.max(1)
    return np.log(np.exp(logits - m[:, None]).sum(1)) + m


@pytest.mark.parametrize(("variant", "pmin", "pmax"), [("a", 60, 85), ("l", 60, 85), ("a", 70, 95)])
def test_adascale_matches_the_official_code(setup, variant, pmin, pmax):
    model, loader, xf, xt = setup
    det = normscore.create("adascale", variant=variant, p_min=pmin, p_max=pmax)
    snap = snapshot(model)
    det.fit(model, loader, calibration=0.0)
    ours = det.score(xt).double().numpy()
    assert_unchanged(model, snap)
    ref = _official_scores(model, xf, xt, variant, pmin, pmax)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_adascale_score_time_params_need_no_refit_and_fit_params_do(setup):
    model, loader, _, xt = setup
    det = normscore.create("adascale").fit(model, loader, calibration=0.0)
    a = det.set_params(variant="l", p_max=90, lmbda=3.0).score(xt)
    fresh = normscore.create("adascale", variant="l", p_max=90, lmbda=3.0).fit(model, loader, calibration=0.0)
    assert torch.equal(a, fresh.score(xt))
    det.set_params(k1=2.0)
    with pytest.raises(ConfigError, match="Refit"):
        det.score(xt)
    with pytest.raises(ConfigError, match="p_min"):
        normscore.create("adascale", p_min=90, p_max=80)


def test_adascale_percentile_follows_the_id_cdf(setup):
    """ID-like samples (low Q') get percentiles near p_max, i.e. stronger scaling."""
    model, loader, _, _xt = setup
    det = normscore.create("adascale").fit(model, loader, calibration=0.0)
    st = det.id_stats_
    lo = det.percentiles(torch.stack([st[:, 0].min() - 1, st[:, 1].min() - 1])[None])
    hi = det.percentiles(torch.stack([st[:, 0].max() + 1, st[:, 1].max() + 1])[None])
    assert float(lo) == pytest.approx(85.0) and float(hi) == pytest.approx(60.0)
