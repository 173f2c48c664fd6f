"""Distance and feature detectors against closed-form / brute-force references (float64 numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo_helpers import FeatNet, features_of, fitted, gaussians

import normscore
from normscore.errors import ConfigError, InputError

D, C, N = 12, 4, 600


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(N, D, C, seed=1)
    xt, _ = gaussians(50, D, C, seed=2, sep=4.0)
    fit = features_of(model, x, y)
    test = features_of(model, xt)
    return model, fit, test


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _maha_reference(h, y, q, shrinkage=0.0, pinv=False):
    classes = np.unique(y)
    means = np.stack([h[y == c].mean(0) for c in classes])
    centred = h - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / len(h)
    if shrinkage:
        cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    prec = np.linalg.pinv(cov, hermitian=True) if pinv else np.linalg.inv(cov)
    d2 = np.stack([np.einsum("bi,ij,bj->b", q - m, prec, q - m) for m in means], 1)
    return d2, means, prec


def test_mahalanobis_equals_closed_form(setup):
    model, fit, test = setup
    h, y, q = _np(fit["penultimate"]), fit["labels"].numpy(), _np(test["penultimate"])
    for lam in (0.0, 0.05):
        det = fitted("mahalanobis", model, fit, shrinkage=lam)
        d2, _, _ = _maha_reference(h, y, q, shrinkage=lam)
        np.testing.assert_allclose(det.score_features(test).double().numpy(), -d2.min(1), rtol=1e-5)
        # per-class distances too
        np.testing.assert_allclose(det.class_sq_distances(test["penultimate"]).numpy(), d2, rtol=1e-6, atol=1e-6)


def test_mahalanobis_rank_deficient_features_use_the_pseudo_inverse():
    """A dead unit (always 0) makes the covariance singular: the score equals scikit-learn's
    pinvh-based reference and stays finite; shrinkage makes it full rank."""
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(300, D, C, seed=3)
    x[:, 0] = 0.0
    xt, _ = gaussians(40, D, C, seed=4)
    xt[:, 0] = 0.0
    fit, test = features_of(model, x, y), features_of(model, xt)
    det = fitted("mahalanobis", model, fit)
    d2, _, _ = _maha_reference(_np(fit["penultimate"]), y.numpy(), _np(test["penultimate"]), pinv=True)
    s = det.score_features(test)
    assert torch.isfinite(s).all()
    np.testing.assert_allclose(s.double().numpy(), -d2.min(1), rtol=1e-5)


def test_mahalanobis_recovers_the_true_distance_on_gaussians():
    """With many samples the fitted score approaches the distance under the true parameters."""
    model = FeatNet(6, 3, relu=False).eval()
    g = torch.Generator().manual_seed(5)
    mu = 3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    y = torch.randint(0, 3, (40000,), generator=g)
    x = mu[y] + torch.randn(40000, 6, generator=g, dtype=torch.float64) @ chol.T
    fit = features_of(model, x.float()[:, :, None, None], y)
    det = fitted("mahalanobis", model, fit)
    q = 3 * torch.randn(30, 6, generator=g, dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    true = torch.stack([torch.einsum("bi,ij,bj->b", q - m, prec, q - m) for m in mu], 1).amin(1)
    got = -det.score_features(features_of(model, q.float()[:, :, None, None])).double()
    assert torch.allclose(got, true, rtol=0.03)


def test_mahalanobis_skips_classes_missing_from_the_fit(setup):
    model, fit, test = setup
    keep = fit["labels"] != 2
    sub = fit.select(keep)
    det = fitted("mahalanobis", model, sub)
    h, y, q = _np(sub["penultimate"]), sub["labels"].numpy(), _np(test["penultimate"])
    d2, _, _ = _maha_reference(h, y, q)
    assert det.present_.tolist() == [True, True, False, True]
    np.testing.assert_allclose(det.score_features(test).double().numpy(), -d2.min(1), rtol=1e-5)


def test_mahalanobis_stats_are_float64_and_stable_far_from_the_origin():
    """Features with a large common offset (1e4) lose nothing: the fit is float64 around a
    reference point and scoring centres before whitening."""
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(400, D, C, seed=6)
    xt, _ = gaussians(30, D, C, seed=7)
    base = fitted("mahalanobis", model, features_of(model, x, y)).score_features(features_of(model, xt))
    shifted = fitted("mahalanobis", model, features_of(model, x + 1e4, y)).score_features(features_of(model, xt + 1e4))
    assert torch.allclose(base, shifted, rtol=1e-3, atol=1e-3)


def test_rmds_equals_closed_form(setup):
    model, fit, test = setup
    h, y, q = _np(fit["penultimate"]), fit["labels"].numpy(), _np(test["penultimate"])
    d2, _, _ = _maha_reference(h, y, q)
    mu0 = h.mean(0)
    cov0 = (h - mu0).T @ (h - mu0) / len(h)
    d0 = np.einsum("bi,ij,bj->b", q - mu0, np.linalg.inv(cov0), q - mu0)
    det = fitted("rmds", model, fit)
    np.testing.assert_allclose(det.score_features(test).double().numpy(), (-(d2 - d0[:, None])).max(1), rtol=1e-5)


def test_knn_equals_brute_force(setup):
    model, fit, test = setup
    bank = torch.nn.functional.normalize(fit["penultimate"].double(), dim=1)
    q = torch.nn.functional.normalize(test["penultimate"].double(), dim=1)
    dist = torch.cdist(q, bank).sort(dim=1).values
    for k in (1, 7, 50):
        det = fitted("knn", model, fit, k=k)
        assert det.bank_.shape == (N, D)
        assert torch.allclose(det.score_features(test).double(), -dist[:, k - 1], atol=1e-6)
    # the query itself is in the bank: k = 1 gives distance 0 exactly (no float cancellation)
    det = fitted("knn", model, fit, k=1)
    assert torch.equal(det.score_features(fit.select(slice(0, 20))), torch.zeros(20))


def test_knn_ivf_is_an_approximation_of_the_flat_search():
    model = FeatNet(8, 3, relu=False).eval()
    x, y = gaussians(4000, 8, 3, seed=8)
    xt, _ = gaussians(100, 8, 3, seed=9)
    fit, test = features_of(model, x, y), features_of(model, xt)
    exact = fitted("knn", model, fit, k=5).score_features(test)
    approx = fitted("knn", model, fit, k=5, index="ivf").score_features(test)
    assert (approx <= exact + 1e-6).all()  # an approximate search can only miss neighbours
    assert (approx - exact).abs().lt(1e-6).float().mean() > 0.8


def test_knn_alpha_subsamples_the_bank_deterministically(setup):
    model, fit, test = setup
    det = fitted("knn", model, fit, alpha=0.3)
    assert 0.2 * N < det.bank_.shape[0] < 0.4 * N
    # the same rows whatever the batching of the fit stream
    parts = [fit.select(slice(i, i + 37)) for i in range(0, N, 37)]
    det2 = normscore.create("knn", alpha=0.3).attach(model).fit_features(parts, calibration=0.0)
    assert torch.equal(det.bank_, det2.bank_)
    det.set_params(alpha=0.5)
    with pytest.raises(ConfigError, match="alpha"):
        det.score_features(test)


def test_knn_needs_a_bank_of_at_least_k_vectors(setup):
    model, fit, _ = setup
    with pytest.raises(InputError, match="k=50"):
        fitted("knn", model, fit.select(slice(0, 20)))
    with pytest.raises(InputError, match="alpha=0.01"):
        fitted("nnguide", model, fit.select(slice(0, 200)))


def _vim_reference(h, logits_fit, w, b, q, logits_q, dim):
    """ViM as in the paper / OpenOOD's postprocessor, in float64 numpy."""
    u = -np.linalg.pinv(w) @ b
    xc = h - u
    cov = xc.T @ xc / len(h)  # EmpiricalCovariance(assume_centered=True)
    vals, vecs = np.linalg.eigh(cov)
    ns = vecs[:, np.argsort(-vals)[dim:]]
    vlogit = np.linalg.norm(xc @ ns, axis=-1)
    alpha = logits_fit.max(-1).mean() / vlogit.mean()
    energy = np.log(np.exp(logits_q).sum(-1))
    return energy - alpha * np.linalg.norm((q - u) @ ns, axis=-1), alpha


def test_vim_matches_its_formula(setup):
    model, fit, test = setup
    w, b = _np(model.fc.weight), _np(model.fc.bias)
    for dim, expected_dim in ((None, D // 2), (3, 3), (0.75, 9)):
        det = fitted("vim", model, fit, dim=dim)
        assert det.principal_dim(D) == expected_dim
        ref, alpha = _vim_reference(
            _np(fit["penultimate"]),
            _np(fit["logits"]),
            w,
            b,
            _np(test["penultimate"]),
            _np(test["logits"]),
            expected_dim,
        )
        assert det.alpha == pytest.approx(alpha, rel=1e-6)
        np.testing.assert_allclose(det.score_features(test).double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_vim_dim_change_needs_no_refit_and_is_checked(setup):
    model, fit, test = setup
    det = fitted("vim", model, fit, dim=2)
    det.set_params(dim=7)
    assert torch.equal(det.score_features(test), fitted("vim", model, fit, dim=7).score_features(test))
    det.set_params(dim=D)
    with pytest.raises(ConfigError, match="smaller than the feature dimension"):
        det.score_features(test)
    for bad in (0, -1, 1.5, "x", True):
        with pytest.raises(ConfigError):
            normscore.create("vim", dim=bad)


def test_she_nnguide_fdbd_match_references(setup):
    model, fit, test = setup
    h, z, y = fit["penultimate"].double(), fit["logits"].double(), fit["labels"]
    q, zq = test["penultimate"].double(), test["logits"].double()
    # SHE: inner product with the mean of correctly classified samples of the predicted class
    pats = torch.stack([h[(y == c) & (z.argmax(1) == c)].mean(0) for c in range(C)])
    she = fitted("she", model, fit).score_features(test).double()
    assert torch.allclose(she, (q * pats[zq.argmax(1)]).sum(1), rtol=1e-5, atol=1e-5)
    # NNGuide: energy x mean top-k similarity to the confidence-scaled bank (brute force)
    guide = torch.nn.functional.normalize(h, dim=1) * torch.logsumexp(z, 1)[:, None]
    sims = torch.nn.functional.normalize(q, dim=1) @ guide.T
    ref = sims.topk(10, dim=1).values.mean(1) * torch.logsumexp(zq, 1)
    got = fitted("nnguide", model, fit, k=10, alpha=1.0).score_features(test).double()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    # fDBD: OpenOOD's denominator-matrix form (diagonal 1, numerator 0), divided by C - 1
    w = model.fc.weight.detach().double()
    den = torch.cdist(w, w)
    den.fill_diagonal_(1.0)
    pred = zq.argmax(1)
    gaps = (zq - zq.max(1, keepdim=True).values).abs()
    num = (gaps / den[pred]).sum(1) / (C - 1)
    for as_dist, norm in ((True, (q - h.mean(0)).norm(dim=1)), (False, q.norm(dim=1))):
        got = fitted("fdbd", model, fit, distance_as_normalizer=as_dist).score_features(test).double()
        assert torch.allclose(got, num / norm, rtol=1e-5)


def test_she_class_without_correct_samples_scores_zero():
    model = FeatNet(D, C, relu=False).eval()
    x, _ = gaussians(200, D, C, seed=10)
    f = features_of(model, x)
    pred = f["logits"].argmax(1)
    f["labels"] = torch.where(pred == 1, torch.zeros_like(pred), pred)  # class 1 is never right
    det = fitted("she", model, f)
    assert det.class_counts_[1] == 0 and torch.equal(det.patterns_[1], torch.zeros(D))
    s = det.score_features(f)
    assert torch.equal(s[pred == 1], torch.zeros(int((pred == 1).sum())))
