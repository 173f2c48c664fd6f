"""GradNorm: the closed form equals autograd of the paper's loss, without a backward pass."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, make_loader, snapshot

import normscore
from normscore.taps import Features


def _autograd_gradnorm(model, x, temperature):
    """Per sample: L1 norm of d/dW of CE(softmax(z/T), uniform), W = the head's weight."""
    adapter = normscore.get_adapter(model)
    adapter.ensure_resolved(x)
    head = adapter.head
    feats = normscore.capture(adapter, x, normscore.CaptureSpec(penultimate=True))
    out = []
    for h in feats["penultimate"]:
        w = head.weight.detach().clone().requires_grad_(True)
        z = h[None] @ w.t() + head.bias.detach()
        loss = -(torch.log_softmax(z / temperature, dim=1)).mean()
        (g,) = torch.autograd.grad(loss, w)
        out.append(g.abs().sum())
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_closed_form_equals_autograd(tiny_model, temperature):
    x = torch.randn(6, 3, 16, 16)
    det = normscore.create("gradnorm", temperature=temperature).fit(tiny_model, make_loader(n=20))
    got = det.score(x)
    ref = _autograd_gradnorm(tiny_model, x, temperature)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7)


def test_needs_no_backward_and_works_on_cached_features(tiny_model):
    det = normscore.create("gradnorm").fit(tiny_model, make_loader())
    assert det.capture_spec(det.adapter, "score").backward is None
    assert det.feature_only and not det.needs_gradients
    z = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.05]])
    h = torch.tensor([[1.0, -2.0], [1.0, -2.0]])
    s = det.score_features(Features(logits=z, penultimate=h))
    p = torch.softmax(z, 1)
    assert torch.allclose(s, (p - 1 / 3).abs().sum(1) * 3.0)
    assert s[0] > s[1]  # confident (ID-like) predictions have the larger gradient norm


def test_temperature_changes_scores_and_model_is_unchanged(tiny_model):
    snap = snapshot(tiny_model)
    x = torch.randn(4, 3, 16, 16)
    a = normscore.create("gradnorm", temperature=1.0).fit(tiny_model, make_loader()).score(x)
    b = normscore.create("gradnorm", temperature=5.0).fit(tiny_model, make_loader()).score(x)
    assert not torch.allclose(a, b)
    assert_unchanged(tiny_model, snap)
