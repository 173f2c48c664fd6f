"""grad_uncertainty: parity with pytorch-ood 0.4 ``GradUncertainty`` (all parameters, and the head
only through its ``param_filter``) on the same TinyCNN and inputs. pytorch-ood returns the negative
summed squared gradient norm (higher = OOD); ours is the norm itself (higher = ID)."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN, assert_unchanged, snapshot
from scipy.stats import spearmanr

import normscore
from normscore.errors import ConfigError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=5)
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 3, 16, 16))
        m.fc.weight.mul_(5.0)
    return m.eval()


X = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("params", ["all", "head"])
def test_parity_with_pytorch_ood(model, params):
    from pytorch_ood.detector import GradUncertainty as PoodGU

    filt = None if params == "all" else (lambda n: n.startswith("fc."))
    theirs = -PoodGU(model, param_filter=filt).predict(X)
    ours = normscore.create("grad_uncertainty", params=params).attach(model).score(X)
    assert spearmanr(ours.numpy(), theirs.numpy()).statistic >= 0.999
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6), (ours - theirs).abs().max()


def test_head_variant_works_on_cached_features_and_all_differs(model):
    det = normscore.create("grad_uncertainty", params="head").attach(model)
    feats = normscore.capture(det.adapter, X, det.capture_spec(det.adapter, "score"))
    assert torch.equal(det.score_features(feats), det.score(X))
    assert not torch.allclose(det.score(X), normscore.create("grad_uncertainty").attach(model).score(X))


def test_frozen_parameters_and_hygiene():
    torch.manual_seed(1)
    m = TinyCNN(num_classes=4).train()
    for p in m.features.parameters():
        p.requires_grad_(False)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    snap = snapshot(m)
    s = normscore.create("grad_uncertainty").attach(m).score(X[:5])
    assert_unchanged(m, snap)  # flags, .grad, BN buffers and train mode untouched
    head = normscore.create("grad_uncertainty", params="head").attach(m).score(X[:5])
    assert torch.allclose(s, head, rtol=1e-4)  # only the head requires grad
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no parameter of the model requires grad"):
        normscore.create("grad_uncertainty").attach(m).score(X[:2])


class _Twice(torch.nn.Module):
    """A block applied twice (shared weights): its per-sample gradient is the sum over calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.block(torch.relu(self.block(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("make", [lambda: TinyCNN(num_classes=5), _Twice])
def test_batched_all_params_equals_one_backward_per_sample(make):
    """``params="all"``: one batched backward through the per-sample gradient engine equals one
    backward pass per sample, also for a layer that runs twice (its calls are summed first)."""
    torch.manual_seed(0)
    m = make().eval()
    x = torch.randn(6, 3, 16, 16)
    det = normscore.create("grad_uncertainty").attach(m)
    det.adapter.ensure_resolved(x)
    params = [p for p in m.parameters() if p.requires_grad]
    from normscore.detectors.engines.layers import resolve_layers

    res = resolve_layers(det.adapter, "all", x[:1])
    assert not res.excluded  # the batched path applies
    assert max(s.calls for s in res.slots) == (2 if make is _Twice else 1)
    fast = det.score(x)
    slow = det._all_per_sample(x, params)
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-6), (fast, slow)
