"""gmm: parity with pytorch-ood 0.4 ``GMM`` (default variant) and, for ``variant="openood"``,
with scikit-learn's tied ``GaussianMixture`` EM (the estimator OpenOOD's ``gmm_postprocessor.py``
calls) plus an independent float64 computation of OpenOOD's score formula.

Conventions: pytorch-ood returns the negative log-likelihood (higher = OOD), normscore the
log-likelihood; both include the Gaussian normalising constants. OpenOOD's score is
``log(sum_k w_k exp(-d_k^2 / 2) + 1e-40)`` in float32; normscore evaluates it exactly (no floor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN, make_loader
from scipy.stats import spearmanr
from zoo_helpers import FeatNet, features_of, fitted, gaussians, loader_of

import normscore
from normscore.detectors.gmm import _m_step, fit_tied_gmm, kmeans_pp
from normscore.errors import ConfigError, InputError
from normscore.taps import CaptureSpec

D, C, N = 8, 3, 450


@pytest.fixture(scope="module")
def setup():
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(N, D, C, seed=1)
    xt, _ = gaussians(80, D, C, seed=2, sep=4.0)
    return model, features_of(model, x, y), features_of(model, xt)


def test_default_matches_pytorch_ood_gmm(setup):
    from pytorch_ood.detector import GMM as PoodGMM

    model, fit, test = setup
    det = fitted("gmm", model, fit)
    ref = PoodGMM(None).fit_features(fit["penultimate"], fit["labels"])
    theirs = -ref.predict_features(test["penultimate"]).double().numpy()
    ours = det.score_features(test).double().numpy()
    assert spearmanr(ours, theirs).statistic >= 0.9999
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_default_matches_pytorch_ood_on_a_cnn_fitted_through_the_model():
    """Fitted with ``fit(model, loader)`` (streamed, batches of 16) vs pytorch-ood on the same
    captured penultimate features, with a larger ``reg`` (few samples per class in 16 dims)."""
    from pytorch_ood.detector import GMM as PoodGMM

    torch.manual_seed(0)
    model = TinyCNN(num_classes=4).eval()
    loader = make_loader(n=400, batch=16, classes=4, seed=2)
    det = normscore.create("gmm", reg=1e-3).fit(model, loader, calibration=0.0)
    adapter = normscore.get_adapter(model)
    spec = CaptureSpec(logits=False, penultimate=True)
    z = torch.cat([normscore.capture(adapter, xb, spec)["penultimate"] for xb, _ in loader])
    y = torch.cat([yb for _, yb in loader])
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 1.5
    q = normscore.capture(adapter, x, spec)["penultimate"]
    theirs = -PoodGMM(None, reg=1e-3).fit_features(z, y).predict_features(q).double().numpy()
    ours = det.score(x).double().numpy()
    rho = spearmanr(ours, theirs).statistic
    assert rho >= 0.999, rho
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)


def test_reg_acts_at_score_time_and_absent_classes_get_no_component(setup):
    model, fit, test = setup
    det = fitted("gmm", model, fit)
    a = det.score_features(test)
    det.set_params(reg=0.5)
    assert torch.allclose(det.score_features(test), fitted("gmm", model, fit, reg=0.5).score_features(test))
    assert not torch.allclose(a, det.score_features(test))
    # a model with an extra class that never occurs in the fit
    m5 = FeatNet(D, C + 1, relu=False).eval()
    f5 = features_of(m5, fit["input"], fit["labels"])
    det5 = fitted("gmm", m5, f5)
    assert det5.present_.tolist() == [True] * C + [False]
    torch.testing.assert_close(det5.score_features(features_of(m5, test["input"])), a)


def test_too_many_class_covariances_are_refused(monkeypatch, setup):
    import normscore.detectors.gmm as g

    model, fit, _ = setup
    monkeypatch.setattr(g, "MAX_CLASS_COV_VALUES", C * D * D - 1)
    with pytest.raises(InputError, match="covariance per class.*variant='openood'"):
        fitted("gmm", model, fit)


def test_singular_class_covariance_asks_for_more_reg(setup):
    model, fit, test = setup
    det = fitted("gmm", model, fit, reg=0.0)
    det.class_covs_ = det.class_covs_.clone()
    det.class_covs_[0] = 0.0
    with pytest.raises(InputError, match="raise reg"):
        det.score_features(test)


# ---------------------------------------------------------------------------------------------
# variant="openood"


def test_tied_em_equals_scikit_learn_from_the_same_initial_parameters():
    from sklearn.mixture import GaussianMixture

    x, _ = gaussians(600, 5, 4, seed=7, sep=2.0)
    x = x.flatten(1).double()
    labels = kmeans_pp(x, 4, seed=0)
    init = _m_step(x, torch.nn.functional.one_hot(labels, 4).double(), 1e-6)
    ours = fit_tied_gmm(x, 4, reg=1e-6, init=init)
    gm = GaussianMixture(
        4,
        covariance_type="tied",
        reg_covar=1e-6,
        tol=1e-3,
        max_iter=100,
        weights_init=init[0].numpy(),
        means_init=init[1].numpy(),
        precisions_init=np.linalg.inv(init[2].numpy()),
        random_state=0,
    ).fit(x.numpy())
    assert gm.n_iter_ == ours["n_iter"]
    np.testing.assert_allclose(ours["weights"].numpy(), gm.weights_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours["means"].numpy(), gm.means_, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ours["cov"].numpy(), gm.covariances_, rtol=1e-7, atol=1e-9)


def _openood_score(u: np.ndarray, weights, means, prec) -> np.ndarray:
    prob = np.stack([np.exp(-0.5 * np.einsum("bi,ij,bj->b", u - m, prec, u - m)) for m in means], 1)
    return np.log(prob @ weights)


def test_openood_variant_scores_with_openoods_formula(setup):
    model, fit, test = setup
    det = fitted("gmm", model, fit, variant="openood", pca_dim=4)
    assert det.proj_.shape == (D, 4) and det.gmm_means_.shape == (C, 4)  # K = classes by default
    h = fit["penultimate"].double().numpy()
    hc = h - h.mean(0)
    vals, vecs = np.linalg.eigh(hc.T @ hc / len(h))
    proj = vecs[:, np.argsort(-vals)[:4]]
    # the PCA subspace is the reference one (up to signs of the axes)
    np.testing.assert_allclose(np.abs(proj.T @ det.proj_.numpy()), np.eye(4), atol=1e-6)
    u = test["penultimate"].double().numpy() @ det.proj_.numpy()
    ref = _openood_score(u, det.gmm_weights_.numpy(), det.gmm_means_.numpy(), np.linalg.inv(det.gmm_cov_.numpy()))
    np.testing.assert_allclose(det.score_features(test).double().numpy(), ref, rtol=1e-5, atol=1e-5)
    # the mixture itself: scikit-learn's EM from the same initial parameters on the same PCA features
    res = fit_tied_gmm(torch.from_numpy(h @ det.proj_.numpy()), C, reg=1e-6, seed=0)
    torch.testing.assert_close(res["means"], det.gmm_means_)


def test_openood_variant_needs_no_labels_is_seeded_and_batch_invariant():
    model = FeatNet(D, C, relu=False).eval()
    x, _ = gaussians(300, D, C, seed=3)
    xt, _ = gaussians(40, D, C, seed=4)
    a = normscore.create("gmm", variant="openood", pca_dim=5).fit(model, loader_of(x, batch=64), calibration=0.0)
    b = normscore.create("gmm", variant="openood", pca_dim=5).fit(model, loader_of(x, batch=7), calibration=0.0)
    torch.testing.assert_close(a.score(xt), b.score(xt), rtol=1e-5, atol=1e-5)
    assert a.em_converged_ and a.n_sampled_rows_ == 300
    c = normscore.create("gmm", variant="openood", pca_dim=5, seed=3).fit(model, loader_of(x), calibration=0.0)
    assert c.score(xt).shape == (40,)
    with pytest.raises(InputError, match="needs labels"):
        normscore.create("gmm").fit(model, loader_of(x), calibration=0.0)


def test_fit_time_hyperparameters_and_variant_changes_ask_for_a_refit(setup):
    model, fit, test = setup
    det = fitted("gmm", model, fit, variant="openood", pca_dim=4)
    det.set_params(seed=5)
    with pytest.raises(ConfigError, match="Refit"):
        det.score_features(test)
    det = fitted("gmm", model, fit)
    det.set_params(variant="openood")
    with pytest.raises(ConfigError, match="refit"):
        det.score_features(test)
    with pytest.raises(ConfigError):
        normscore.create("gmm", variant="sklearn")


def test_openood_variant_fits_twice_identically_and_saves(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN(num_classes=5).eval()
    loader = make_loader(n=60, batch=20, classes=5)
    x = torch.randn(9, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    a = normscore.create("gmm", variant="openood").fit(model, loader)
    b = normscore.create("gmm", variant="openood").fit(model, loader)
    assert torch.equal(a.score(x), b.score(x))
    a.save(tmp_path / "g.ns")
    back = normscore.load(tmp_path / "g.ns", model=model)
    assert torch.equal(back.score(x), a.score(x)) and back.get_params() == a.get_params()
