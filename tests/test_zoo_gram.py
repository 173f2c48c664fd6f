"""gram: parity with pytorch-ood 0.4 ``Gram`` and a float64 reference of the authors' (OpenOOD
``gram_tools.py``) formula.

* ``variant="pytorch_ood"``: same TinyCNN, data, layers (the two conv+BN+ReLU stages, the
  adapter's candidate blocks) and poles; pytorch-ood's held-out split is a ``torch.randperm``,
  so both fit with ``validation_fraction=0`` (layer norms 1) for the score parity, and the
  layer norms of our hash-based hold-out are checked against a float64 reference separately.
  Sign: pytorch-ood returns the deviation (higher = OOD); ours is its negative.
* ``variant="openood"``: bounds per predicted class, deviations divided by the MSP confidence,
  compared with a numpy float64 reference written from the authors' code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN, make_loader
from scipy.stats import spearmanr

import normscore
from normscore.detectors._zoo import hash_positions
from normscore.errors import InputError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=5)
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 3, 16, 16))
        m.fc.weight.mul_(10.0)
    return m.eval()


LOADER = make_loader(n=200, batch=32, classes=5)
X = torch.randn(80, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 1.5


def _maps(model, x):
    """The two block outputs (after each ReLU) in float64, by a plain forward."""
    f = model.features
    with torch.no_grad():
        a = f[0:3](x)
        b = f[3:7](a)
        z = model.fc(f[7:](b))
    return [a.double().numpy(), b.double().numpy()], z.double().numpy()


def _grams(maps, poles):
    rows = []
    for fm in maps:
        t = fm.reshape(fm.shape[0], fm.shape[1], -1)
        per = []
        for p in range(1, poles + 1):
            tp = t**p
            g = np.einsum("bcs,bds->bcd", tp, tp).sum(axis=2)
            per.append(np.sign(g) * np.abs(g) ** (1.0 / p))
        rows.append(np.concatenate(per, axis=1))
    return rows  # per layer [B, P*C]


def _dev(g, mn, mx):
    return (np.maximum(mn - g, 0) / np.abs(mn + 1e-6)).sum(1) + (np.maximum(g - mx, 0) / np.abs(mx + 1e-6)).sum(1)


@pytest.mark.parametrize("poles", [1, 3])
def test_parity_with_pytorch_ood(model, poles):
    from pytorch_ood.detector import Gram as PoodGram

    f = model.features
    ref = PoodGram(
        head=torch.nn.Sequential(f[7:], model.fc),
        feature_layers=[f[0:3], f[3:7]],
        num_classes=5,
        num_poles_list=list(range(1, poles + 1)),
    )
    ref.validation_fraction = 0.0
    ref.fit(LOADER)
    det = normscore.create("gram", poles=poles, validation_fraction=0.0).fit(model, LOADER, calibration=0.0)
    assert det.blocks_ == ["features.2", "features.6"]
    ours = det.score(X)
    theirs = -ref.predict(X)
    rho = spearmanr(ours.numpy(), theirs.numpy()).statistic
    assert rho >= 0.999, rho
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4), (ours - theirs).abs().max()


def _reference(model, poles, variant, frac):
    xs = torch.cat([b[0] for b in LOADER])
    ys = torch.cat([b[1] for b in LOADER]).numpy()
    maps, z = _maps(model, xs)
    rows = _grams(maps, poles)
    conf = np.exp(z - z.max(1, keepdims=True))
    conf = (conf / conf.sum(1, keepdims=True)).max(1)
    cls = ys if variant == "pytorch_ood" else z.argmax(1)
    hold = (hash_positions(torch.arange(len(xs)), 0x6A09E667) < frac).numpy()
    bounds = []
    for g in rows:
        mn = np.full((5, g.shape[1]), np.inf)
        mx = np.full((5, g.shape[1]), -np.inf)
        for k in range(5):
            sel = (cls == k) & ~hold
            if sel.any():
                mn[k], mx[k] = g[sel].min(0), g[sel].max(0)
        empty = np.isinf(mn).all(1)
        mn[empty], mx[empty] = mn[~empty].min(0), mx[~empty].max(0)
        bounds.append((mn, mx))

    def layer_devs(rows_, cls_, conf_):
        d = np.stack([_dev(g, mn[cls_], mx[cls_]) for g, (mn, mx) in zip(rows_, bounds)], axis=1)
        return d / conf_[:, None] if variant == "openood" else d

    if hold.any():
        mean = layer_devs([g[hold] for g in rows], cls[hold], conf[hold]).mean(0)
        norm = np.where(mean > 0, mean, 1.0) if variant == "pytorch_ood" else mean + 1e-7
    else:
        norm = np.ones(2) + (1e-7 if variant == "openood" else 0.0)
    tmaps, tz = _maps(model, X)
    tconf = np.exp(tz - tz.max(1, keepdims=True))
    tconf = (tconf / tconf.sum(1, keepdims=True)).max(1)
    d = layer_devs(_grams(tmaps, poles), tz.argmax(1), tconf)
    return -(d / norm[None, :]).sum(1), norm


@pytest.mark.parametrize("variant", ["pytorch_ood", "openood"])
def test_reference_with_the_hash_holdout(model, variant):
    """Bounds, held-out layer norms and scores equal a float64 reference of the formula."""
    det = normscore.create("gram", poles=3, variant=variant, validation_fraction=0.2).fit(
        model, LOADER, calibration=0.0
    )
    ref, norm = _reference(model, 3, variant, 0.2)
    assert det.n_holdout_ > 20
    assert np.allclose(det.layer_norm_.numpy(), norm, rtol=1e-4)
    ours = det.score(X).double().numpy()
    assert spearmanr(ours, ref).statistic >= 0.999
    assert np.allclose(ours, ref, rtol=1e-4, atol=1e-4), np.abs(ours - ref).max()


def test_variants_differ_and_only_pytorch_ood_needs_labels(model):
    unlabelled = [b[0] for b in LOADER]
    with pytest.raises(InputError, match="labels"):
        normscore.create("gram").fit(model, unlabelled)
    a = normscore.create("gram", variant="openood").fit(model, unlabelled).score(X)
    b = normscore.create("gram").fit(model, LOADER).score(X)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_fewer_blocks_and_bad_block_names(model):
    det = normscore.create("gram", blocks=["features.6"]).fit(model, LOADER)
    assert det.layer_sizes_ == [10 * 16] and det.score(X).shape == (80,)
    with pytest.raises(normscore.errors.AdapterError, match="not a candidate block"):
        normscore.create("gram", blocks=["features.1"]).fit(model, LOADER)
    with pytest.raises(normscore.errors.ConfigError):
        normscore.create("gram", blocks=[])


def test_ood_scores_lower_than_id(model):
    det = normscore.create("gram").fit(model, make_loader(n=300, batch=50, classes=5, seed=2))
    id_x = torch.randn(50, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ood_x = 6.0 * torch.rand(50, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    assert det.score(id_x).mean() > det.score(ood_x).mean()
