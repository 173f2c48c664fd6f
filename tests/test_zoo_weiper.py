"""WeiPer against an independent float64 numpy reference of the official code's formula
(``calculate_WeiPerKLDiv_score`` with ``exact_minmax``: per-sample ``probability=True`` histograms
over the fit range, ``UniformKernel`` smoothing = ``Conv1d(padding="same", padding_mode="replicate")``,
symmetric ``kldiv`` against the fit mean histogram, mean MSP of the perturbed heads). pytorch-ood
has no WeiPer. The perturbed head is rebuilt in the test from the documented recipe and seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from zoo_helpers import FeatNet, features_of, fitted, gaussians

from normscore.errors import ConfigError

D, C = 16, 4


def _perturbed(w, b, r, delta, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [
        w + delta * F.normalize(torch.randn(w.shape, generator=g), dim=1) * w.norm(dim=1, keepdim=True)
        for _ in range(r)
    ]
    return torch.cat(parts).double().numpy(), b.repeat(r).double().numpy()


def _hist(v, lo, hi, n):
    lo32, hi32 = np.float32(lo), np.float32(hi) + np.float32(1e-8)
    edges = lo32 + (np.arange(n + 1, dtype=np.float32) / np.float32(n)) * (hi32 - lo32)
    out = np.zeros((v.shape[0], n))
    for i in range(n):
        out[:, i] = ((v >= edges[i]) & (v < edges[i + 1])).mean(1)
    return out


def _smooth(d, k):
    left = (k - 1) // 2
    padded = np.concatenate([np.repeat(d[:, :1], left, 1), d, np.repeat(d[:, -1:], k - 1 - left, 1)], 1)
    return np.stack([padded[:, i : i + k].mean(1) for i in range(d.shape[1])], 1)


def _kl(p, q, k, eps):
    q_ = _smooth(q, k) + eps
    p_ = p[None] + eps
    p_, q_ = p_ / p_.sum(1, keepdims=True), q_ / q_.sum(1, keepdims=True)
    return (p_ * np.log(p_ / q_)).sum(1) + (q_ * np.log(q_ / p_)).sum(1)


def _reference(model, hfit, htest, hp):
    w, b = model.fc.weight.detach().float(), model.fc.bias.detach().float()
    wt, bt = _perturbed(w, b, hp["n_repeats"], hp["perturbation_distance"], 0)
    zf, zt = (
        hfit.astype(np.float32) @ wt.T.astype(np.float32) + bt,
        htest.astype(np.float32) @ wt.T.astype(np.float32) + bt,
    )
    n = hp["n_bins"]
    p = _hist(hfit, hfit.min(), hfit.max(), n).mean(0)
    pw = _hist(zf, zf.min(), zf.max(), n).mean(0)
    kl = _kl(p, _hist(htest, hfit.min(), hfit.max(), n), hp["smoothing"], 0.01)
    klw = _kl(pw, _hist(zt, zf.min(), zf.max(), n), hp["smoothing_perturbed"], 0.025)
    logits = zt.reshape(zt.shape[0], hp["n_repeats"], C).astype(np.float64)
    e = np.exp(logits - logits.max(2, keepdims=True))
    msp = (e / e.sum(2, keepdims=True)).max(2).mean(1)
    return -(kl + hp["lambda_1"] * klw - hp["lambda_2"] * msp)


@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"n_repeats": 7, "perturbation_distance": 1.8, "n_bins": 30, "smoothing": 5, "smoothing_perturbed": 8},
    ],
)
def test_weiper_matches_the_official_formula(hp):
    model = FeatNet(D, C, relu=True).eval()
    x, y = gaussians(300, D, C, seed=1, offset=0.5)
    xt, _ = gaussians(50, D, C, seed=2, sep=4.0)
    fit, test = features_of(model, x, y), features_of(model, xt)
    det = fitted("weiper", model, fit, **hp)
    full = {**{k: v for k, v in det.get_params().items()}, **hp}
    ref = _reference(model, fit["penultimate"].double().numpy(), test["penultimate"].double().numpy(), full)
    np.testing.assert_allclose(det.score_features(test).double().numpy(), ref, rtol=1e-4, atol=1e-4)


def test_weiper_perturbation_is_seeded_and_needs_a_refit_when_changed():
    model = FeatNet(D, C).eval()
    x, y = gaussians(120, D, C, seed=3)
    fit = features_of(model, x, y)
    a = fitted("weiper", model, fit, n_repeats=5).score_features(fit)
    b = fitted("weiper", model, fit, n_repeats=5).score_features(fit)
    c = fitted("weiper", model, fit, n_repeats=5, seed=1).score_features(fit)
    assert torch.equal(a, b) and not torch.equal(a, c)
    det = fitted("weiper", model, fit, n_repeats=5)
    det.set_params(perturbation_distance=1.0)
    with pytest.raises(ConfigError, match="Refit"):
        det.score_features(fit)
