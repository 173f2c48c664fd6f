"""mcd: parity with pytorch-ood 0.4 ``MCD`` (modes "var" and "mean") and a float64 reference of
OpenOOD's dropout postprocessor.

pytorch-ood draws its masks from the global RNG (``model.train()``, BatchNorm kept in eval), ours
from per-sample seeded generators, so the parity test *replays* the masks our detector drew:
``F.dropout`` / ``F.dropout2d`` are patched during pytorch-ood's passes to apply them in the same
order. Sign: pytorch-ood returns the variance / ``-max mean softmax`` (higher = OOD); ours the
negatives. OpenOOD: ``max softmax(mean_n fc(dropout(h)))``, computed here from the same masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyCNN, assert_unchanged, snapshot
from scipy.stats import spearmanr
from torch import nn

import normscore
from normscore.detectors import mcd as mcd_mod
from normscore.errors import ConfigError


class DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout2d(0.2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.5),
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = DropNet()
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 3, 16, 16))
        m.fc.weight.mul_(8.0)
    return m.eval()


X = torch.randn(30, 3, 16, 16, generator=torch.Generator().manual_seed(4))


class _Recorder:
    """Records the scaled masks our detector draws, then replays them in the same order."""

    def __init__(self, monkeypatch) -> None:
        self.masks: list[torch.Tensor] = []
        orig = mcd_mod._Masks.keep

        def keep(obj, *a, **k):
            m = orig(obj, *a, **k)
            self.masks.append(m)
            return m

        monkeypatch.setattr(mcd_mod._Masks, "keep", keep)

    def replay(self, monkeypatch) -> None:
        it = iter(list(self.masks))

        def drop(x, p=0.5, training=True, inplace=False):
            assert training
            return x * next(it)

        monkeypatch.setattr(F, "dropout", drop)
        monkeypatch.setattr(F, "dropout2d", drop)


@pytest.mark.parametrize("mode", ["var", "mean"])
def test_parity_with_pytorch_ood_on_replayed_masks(model, mode, monkeypatch):
    from pytorch_ood.detector import MCD as PoodMCD

    rec = _Recorder(monkeypatch)
    ours = normscore.create("mcd", variant=mode, samples=7).attach(model).score(X)
    assert len(rec.masks) == 7 * 2  # two dropout modules per pass
    rec.replay(monkeypatch)
    theirs = -PoodMCD(model, samples=7, mode=mode).predict(X)
    assert not model.training  # pytorch-ood put it back
    assert spearmanr(ours.numpy(), theirs.numpy()).statistic >= 0.999
    assert torch.allclose(ours, theirs.float(), rtol=1e-4, atol=1e-6), (ours - theirs).abs().max()


def test_openood_head_dropout_equals_a_float64_reference(monkeypatch):
    torch.manual_seed(0)
    m = TinyCNN(num_classes=5).eval()
    with torch.no_grad():
        m.fc.weight.mul_(8.0)
    rec = _Recorder(monkeypatch)
    ours = normscore.create("mcd", variant="openood", where="head", p=0.5, samples=5).attach(m).score(X)
    with torch.no_grad():
        h = m.features(X).double()
    w, b = m.fc.weight.double(), m.fc.bias.double()
    z = sum(((h * k.double()) @ w.T + b) for k in rec.masks) / 5
    ref = torch.softmax(z, dim=1).amax(1)
    assert len(rec.masks) == 5
    assert set(torch.unique(rec.masks[0]).tolist()) <= {0.0, 2.0}
    assert torch.allclose(ours.double(), ref, atol=1e-6)


def test_no_dropout_is_a_clear_error():
    m = TinyCNN(num_classes=5).eval()
    with pytest.raises(ConfigError, match="needs dropout modules"):
        normscore.create("mcd").attach(m).score(X[:2])
    m2 = nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(3 * 16 * 16, 4))  # p = 0 does not count
    with pytest.raises(ConfigError, match="needs dropout modules"):
        normscore.create("mcd").attach(m2).score(X[:2])


def test_seeded_independent_of_global_rng_and_batch_composition(model):
    det = normscore.create("mcd", samples=6).attach(model)
    torch.manual_seed(123)
    a = det.score(X)
    torch.manual_seed(456)
    b = torch.cat([det.score(X[i : i + 7]) for i in range(0, len(X), 7)])
    assert torch.equal(a, b)
    perm = torch.randperm(len(X))
    assert torch.equal(det.score(X[perm]), a[perm])
    assert torch.equal(det.score(torch.cat([X[:3], torch.randn(5, 3, 16, 16)]))[:3], a[:3])
    assert not torch.allclose(normscore.create("mcd", samples=6, seed=1).attach(model).score(X), a)
    with torch.no_grad():
        plain = model(X)
    assert torch.equal(model(X), plain)  # dropout is not left on


def test_model_flags_params_and_train_mode_are_restored(model):
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    snap = snapshot(model)
    s = normscore.create("mcd", samples=4).attach(model).score(X[:6])
    assert_unchanged(model, snap)
    ref = model.__class__()
    ref.load_state_dict(model.state_dict())
    assert torch.equal(normscore.create("mcd", samples=4).attach(ref.eval()).score(X[:6]), s)


def test_head_dropout_runs_the_network_once_and_equals_full_passes():
    """``where="head"``: the network up to the head runs once and each stochastic pass is the head
    on masked features; that equals running the whole model with the masked head input."""
    torch.manual_seed(0)
    m = TinyCNN(num_classes=5).eval()
    x = torch.randn(7, 3, 16, 16)
    det = normscore.create("mcd", where="head", samples=4).attach(m)
    det.adapter.ensure_resolved(x)
    keys = mcd_mod.sample_keys(x)
    fast = list(det._head_passes(x, keys))
    full = [det.pass_logits(x, n, keys) for n in range(4)]
    for a, b in zip(fast, full):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    calls = []
    h = m.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        det.score(x)
    finally:
        h.remove()
    assert len(calls) == 1  # one forward pass, not one per sample
