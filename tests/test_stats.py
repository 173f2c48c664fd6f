"""Mergeable statistics, fitting from cached features, input views."""

from __future__ import annotations

import torch

import normscore
from normscore.stats import ClassMoments, RunningMoments
from normscore.taps import CaptureSpec, capture, register_view


def test_running_moments_equal_direct_computation_for_any_batching():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 7, generator=g, dtype=torch.float64) * 3 + 100
    ref_mean = x.mean(0)
    ref_m2 = (x - ref_mean).T @ (x - ref_mean)
    for sizes in ([301], [1] * 301, [100, 1, 200], [7] * 43):
        rm, rd = RunningMoments(7), RunningMoments(7, diagonal=True)
        i = 0
        for s in sizes:
            rm.update(x[i : i + s])
            rd.update(x[i : i + s])
            i += s
        assert rm.n == 301
        assert torch.allclose(rm.mean, ref_mean, rtol=1e-12)
        assert torch.allclose(rm.m2, ref_m2, rtol=1e-10)
        assert torch.allclose(rd.m2, ref_m2.diagonal(), rtol=1e-10)
    a, b = RunningMoments(7), RunningMoments(7)
    a.update(x[:50])
    b.update(x[50:])
    a.merge(b)
    assert torch.allclose(a.m2, ref_m2, rtol=1e-10)


def test_class_moments_match_direct_pooled_scatter():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64) + 50
    y = torch.randint(0, 4, (500,), generator=g)
    cm = ClassMoments(4, 5)
    for i in range(0, 500, 37):
        cm.update(x[i : i + 37], y[i : i + 37])
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    sw = sum((x[y == c] - means[c]).T @ (x[y == c] - means[c]) for c in range(4))
    assert torch.allclose(cm.means(), means, rtol=1e-12)
    assert torch.allclose(cm.within_scatter(), sw, rtol=1e-9)
    n, m, s = cm.total_moments()
    assert (
        n == 500 and torch.allclose(m, x.mean(0)) and torch.allclose(s, (x - x.mean(0)).T @ (x - x.mean(0)), rtol=1e-9)
    )


def test_fit_features_equals_fit(resnet, loader):
    from helpers import make_loader

    loader = make_loader(size=32, n=60, batch=16)
    ds = normscore.DetectorSet(["energy", "penultimate_norm"]).fit(resnet, loader)
    spec = ds.capture_spec("fit") | ds.capture_spec("calibrate")
    a = normscore.get_adapter(resnet)
    cached = [capture(a, x, spec) for x, _ in loader]
    ds2 = normscore.DetectorSet(["energy", "penultimate_norm"]).attach(resnet).fit_features(cached)
    for k in ds.detectors:
        assert ds.detectors[k].decision == ds2.detectors[k].decision


def test_views_are_captured_in_the_same_pass(tiny_model):
    register_view("flip_test", lambda x, idx: x.flip(-1))
    a = normscore.get_adapter(tiny_model)
    x = torch.randn(4, 3, 16, 16)
    f = capture(a, x, CaptureSpec(penultimate=True, views=frozenset({"flip_test"})))
    g = capture(a, x.flip(-1), CaptureSpec(penultimate=True))
    assert torch.allclose(f["flip_test|penultimate"], g["penultimate"], atol=1e-5)
    assert torch.allclose(f["penultimate"], capture(a, x, CaptureSpec(penultimate=True))["penultimate"], atol=1e-5)
