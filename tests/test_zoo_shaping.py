"""Activation shaping (ReAct, ASH, SCALE, DICE) against direct re-implementations of the
reference code, and the streamed percentile machinery behind ReAct."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo_helpers import FeatNet, features_of, fitted

import normscore
from normscore.detectors import _zoo

D, C = 40, 7


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = FeatNet(D, C, relu=True).eval()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(500, D, generator=g) + 0.3 * torch.arange(D) / D)[:, :, None, None]
    # strictly positive test features: no ties at ASH's cut (tie handling is tested separately)
    xt = ((1.5 * torch.randn(60, D, generator=g)).abs() + 0.01)[:, :, None, None]
    return model, features_of(model, x), features_of(model, xt)


def _head(model):
    return model.fc.weight.detach().double(), model.fc.bias.detach().double()


def _energy(h, w, b):
    return torch.logsumexp(h @ w.T + b, dim=1)


# re-implementations of the reference code (ASH authors / OpenOOD), on [B, D, 1, 1] tensors
def _ref_ash_p(x, p):
    b, c, hh, ww = x.shape
    n = x.shape[1:].numel()
    k = n - int(np.round(n * p / 100.0))
    t = x.view((b, c * hh * ww))
    v, i = torch.topk(t, k, dim=1)
    t.zero_().scatter_(dim=1, index=i, src=v)
    return x


def _ref_ash_b(x, p):
    b, c, hh, ww = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(np.round(n * p / 100.0))
    t = x.view((b, c * hh * ww))
    v, i = torch.topk(t, k, dim=1)
    fill = (s1 / k).unsqueeze(dim=1).expand(v.shape)
    t.zero_().scatter_(dim=1, index=i, src=fill)
    return x


def _ref_ash_s(x, p):
    s1 = x.sum(dim=[1, 2, 3])
    x = _ref_ash_p(x, p)
    s2 = x.sum(dim=[1, 2, 3])
    return x * torch.exp(s1 / s2)[:, None, None, None]


def _ref_scale(x, p):
    inp = x.clone()
    s1 = x.sum(dim=[1, 2, 3])
    x = _ref_ash_p(x, p)
    s2 = x.sum(dim=[1, 2, 3])
    return inp * torch.exp(s1 / s2)[:, None, None, None]


def test_react_matches_reference(setup):
    model, fit, test = setup
    w, b = _head(model)
    acts = fit["penultimate"].double().numpy().flatten()
    for p in (90, 72.5):
        det = fitted("react", model, fit, percentile=p)
        c = np.percentile(acts, p)
        assert det.threshold == pytest.approx(c, rel=1e-12)
        ref = _energy(test["penultimate"].double().clamp(max=c), w, b)
        assert torch.allclose(det.score_features(test).double(), ref, rtol=1e-5)
    # an off-grid percentile is interpolated in the 0.01-percentile table: close, not exact
    det = fitted("react", model, fit, percentile=87.123)
    assert det.threshold == pytest.approx(np.percentile(acts, 87.123), rel=1e-3)


@pytest.mark.parametrize("variant", ["p", "b", "s"])
@pytest.mark.parametrize("p", [65, 90])
def test_ash_matches_reference(setup, variant, p):
    model, _, test = setup
    w, b = _head(model)
    ref_fn = {"p": _ref_ash_p, "b": _ref_ash_b, "s": _ref_ash_s}[variant]
    h = test["penultimate"].double()
    shaped = ref_fn(h.clone()[:, :, None, None], p).flatten(1)
    det = normscore.create("ash", percentile=p, variant=variant).attach(model)
    assert torch.allclose(det.shape(h.float()).double(), shaped, rtol=1e-5, atol=1e-5)
    assert torch.allclose(det.score_features(test).double(), _energy(shaped, w, b), rtol=1e-5, atol=1e-5)


def test_ash_breaks_ties_by_unit_index_so_binarisation_is_deterministic():
    h = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    det = normscore.create("ash", percentile=80, variant="b")  # keeps 2 of 10
    assert det.shape(h).tolist() == [[0.0, 1.5, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert normscore.create("ash", percentile=99).shape(torch.ones(1, 10)).count_nonzero() == 1  # at least 1 kept
    assert torch.equal(normscore.create("ash").shape(torch.zeros(2, 10)), torch.zeros(2, 10))


@pytest.mark.parametrize("p", [65, 85, 95])
def test_scale_matches_reference(setup, p):
    model, _, test = setup
    w, b = _head(model)
    h = test["penultimate"].double()
    shaped = _ref_scale(h.clone()[:, :, None, None], p).flatten(1)
    det = normscore.create("scale", percentile=p).attach(model)
    assert torch.allclose(det.score_features(test).double(), _energy(shaped, w, b), rtol=1e-5, atol=1e-5)


def test_dice_equals_the_masked_linear_reference(setup):
    model, fit, test = setup
    w, b = _head(model)
    mean = fit["penultimate"].double().mean(0)
    for p in (90, 50):
        contrib = (mean[None, :] * w).numpy()
        thresh = np.percentile(contrib, p)
        masked = w * torch.from_numpy(contrib > thresh)
        vote = test["penultimate"].double()[:, None, :] * masked  # OpenOOD's [B, C, D] form
        ref = torch.logsumexp(vote.sum(2) + b, dim=1)
        det = fitted("dice", model, fit, percentile=p)
        assert int((det.masked_weight() != 0).sum()) == int((contrib > thresh).sum())
        assert torch.allclose(det.score_features(test).double(), ref, rtol=1e-5)


def test_percentile_changes_need_no_refit(setup):
    model, fit, test = setup
    for name, values in (("react", [80, 99]), ("dice", [10, 70])):
        det = fitted(name, model, fit)
        for v in values:
            det.set_params(percentile=v)
            assert torch.equal(det.score_features(test), fitted(name, model, fit, percentile=v).score_features(test))


# ---------------------------------------------------------------------------------------------
# the bounded row sample behind ReAct's percentile and ViM's alpha


def test_row_sample_is_uniform_bounded_and_batching_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 3, generator=g)
    results = []
    for bs in (1, 17, 3000):
        rs = _zoo.RowSample(200, salt=5)
        for i in range(0, 3000, bs):
            rs.add(x[i : i + bs])
        results.append(rs.rows())
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert results[0].shape == (200, 3)
    # rows are real rows of the stream, in stream order, and spread over the whole stream
    pos = [int((x == r).all(1).nonzero()) for r in results[0]]
    assert pos == sorted(pos) and min(pos) < 300 and max(pos) > 2700
    # fewer rows than the capacity: everything is kept (exact statistics)
    rs = _zoo.RowSample(5000)
    rs.add(x)
    assert torch.equal(rs.rows(), x)


def test_react_percentile_from_a_subsample_is_close(setup, monkeypatch):
    """With a sample budget smaller than the fit split the threshold is estimated, closely."""
    model, fit, _ = setup
    monkeypatch.setattr("normscore.detectors.shaping.sample_rows_for", lambda d: 150)
    det = fitted("react", model, fit)
    assert det.n_sampled_rows_ == 150
    exact = np.percentile(fit["penultimate"].double().numpy(), 90)
    assert det.threshold == pytest.approx(exact, rel=0.05)
    assert det.threshold != exact
