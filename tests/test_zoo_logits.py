"""Logit detectors of the zoo (entropy, GEN, TempScale, ODIN, KLM) against direct references."""

from __future__ import annotations

import math

import pytest
import scipy.optimize
import torch
from helpers import TinyCNN
from zoo_helpers import FeatNet, features_of, fitted, gaussians

import normscore
from normscore.taps import Features


def _logits(b=40, c=12, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, c, generator=g)


def test_entropy_and_gen_formulas():
    z = _logits()
    p = torch.softmax(z.double(), 1)
    ent = normscore.create("entropy").score_features(Features(logits=z))
    assert torch.allclose(ent.double(), (p * p.log()).sum(1), atol=1e-6)
    for gamma, m in ((0.1, 100), (0.5, 3), (2.0, 1)):
        top = p.sort(dim=1).values[:, -m:]  # OpenOOD's form: the M largest probabilities
        ref = -(top**gamma * (1 - top) ** gamma).sum(1)
        got = normscore.create("gen", gamma=gamma, M=m).score_features(Features(logits=z))
        assert torch.allclose(got.double(), ref, atol=1e-6), (gamma, m)


def _nll(t, z, y):
    return torch.nn.functional.cross_entropy(z / t, y, reduction="sum").item()


@pytest.mark.parametrize("scale", [0.3, 3.0, 20.0])
def test_tempscale_fits_the_nll_minimiser(scale):
    """The streamed grid + Hermite fit equals a full-batch scalar optimiser on all logits."""
    model = FeatNet(8, 5, relu=False).eval()
    with torch.no_grad():
        model.fc.weight.mul_(scale)
    x, _ = gaussians(3000, 8, 5, seed=11)
    f = features_of(model, x)
    z = f["logits"].double()
    g = torch.Generator().manual_seed(0)
    # labels agree with the prediction 80% of the time: a finite optimum
    y = torch.where(torch.rand(3000, generator=g) < 0.8, z.argmax(1), torch.randint(0, 5, (3000,), generator=g))
    f["labels"] = y
    parts = [f.select(slice(i, i + 128)) for i in range(0, 3000, 128)]
    det = normscore.create("tempscale").attach(model).fit_features(parts, calibration=0.0)
    res = scipy.optimize.minimize_scalar(
        lambda lt: _nll(math.exp(lt), z, y),
        bounds=(math.log(0.01), math.log(100)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    assert det.temperature_ == pytest.approx(math.exp(res.x), rel=1e-4)
    zs = z.float()
    assert torch.allclose(det.score_features(Features(logits=zs)), torch.softmax(zs / det.temperature_, 1).amax(1))


def test_tempscale_temperature_does_not_depend_on_batching():
    model = FeatNet(8, 5, relu=False).eval()
    x, y = gaussians(200, 8, 5, seed=12)
    f = features_of(model, x, y)
    ts = []
    for bs in (1, 33, 200):
        parts = [f.select(slice(i, i + bs)) for i in range(0, 200, bs)]
        ts.append(normscore.create("tempscale").attach(model).fit_features(parts, calibration=0.0).temperature_)
    assert ts[0] == pytest.approx(ts[1], rel=1e-9) and ts[1] == pytest.approx(ts[2], rel=1e-9)


def _odin_reference(model, x, t, eps):
    """ODIN's reference code, one sample at a time with autograd (sign convention: ge(0))."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        z = model(xi)
        loss = torch.nn.functional.cross_entropy(z / t, z.argmax(1))
        (g,) = torch.autograd.grad(loss, xi)
        direction = (torch.ge(g, 0).float() - 0.5) * 2
        out.append((xi - eps * direction).detach())
    return torch.cat(out)


def test_odin_perturbation_matches_autograd_per_sample():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=5).eval()
    x = torch.randn(9, 3, 16, 16)
    for t, eps in ((1000.0, 0.0014), (1.0, 0.01)):
        det = normscore.create("odin", temperature=t, noise=eps).attach(model)
        ref = _odin_reference(model, x, t, eps)
        got = det.perturb(x)
        assert torch.equal(torch.sign(got - x), torch.sign(ref - x)), (t, eps)
        assert torch.allclose(got, ref, atol=1e-7)
        with torch.no_grad():
            ref_score = torch.softmax(model(ref) / t, 1).amax(1)
        assert torch.allclose(det.score(x), ref_score, atol=1e-6)
    # eps = 0: temperature-scaled MSP, no backward pass
    det = normscore.create("odin", temperature=10.0, noise=0.0).attach(model)
    with torch.no_grad():
        assert torch.allclose(det.score(x), torch.softmax(model(x) / 10.0, 1).amax(1))


def test_odin_is_not_feature_only_and_needs_gradients():
    info = normscore.detector_info("odin")
    assert info["needs_gradients"] and not info["feature_only"]
    model = FeatNet(8, 3).eval()
    f = features_of(model, torch.randn(10, 8, 1, 1))
    with pytest.raises(normscore.ConfigError, match="odin"):
        normscore.DetectorSet(["odin", "msp"]).attach(model).fit_features(f)


def test_klm_matches_min_kl_to_predicted_class_templates():
    model = FeatNet(10, 6, relu=False).eval()
    x, _ = gaussians(800, 10, 6, seed=13)
    xt, _ = gaussians(30, 10, 6, seed=14, sep=1.0)
    fit, test = features_of(model, x), features_of(model, xt)
    p = torch.softmax(fit["logits"].double(), 1)
    pred = p.argmax(1)
    templates = {c: p[pred == c].mean(0) for c in range(6) if bool((pred == c).any())}
    q = torch.softmax(test["logits"].double(), 1)
    ref = torch.tensor(
        [-min(float((qi * (qi / d).log()).sum()) for d in templates.values()) for qi in q], dtype=torch.float64
    )
    det = fitted("klm", model, fit)
    assert det.present_.sum() == len(templates)
    assert torch.allclose(det.score_features(test).double(), ref, atol=1e-6)
