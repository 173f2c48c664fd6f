"""CFOOD against OpenOOD v1.5's ``cfood_postprocessor.py`` (pytorch-ood has no CFOOD): its
setup (normalised reference features, the k-fraction grid, self-k-NN distances) and its
per-sample loop recomputed in numpy float64 from the postprocessor's code, with the whole fit
split as reference set (``alpha = 1``; OpenOOD's ``alpha < 1`` draws a random permutation,
normscore a hash-of-position sample). Same sign: OpenOOD's ``conf = -kappa``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN

import normscore
from normscore.errors import InputError


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=10, width=16)
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 3, 16, 16))
    m.eval()
    g = torch.Generator().manual_seed(1)
    xf = torch.randn(300, 3, 16, 16, generator=g)
    xt = torch.cat([torch.randn(40, 3, 16, 16, generator=g), 3 * torch.rand(40, 3, 16, 16, generator=g)])
    loader = [xf[i : i + 64] for i in range(0, 300, 64)]
    with torch.no_grad():
        hf = m.features(xf).double().numpy()
        ht = m.features(xt).double().numpy()
    return m, loader, xt, hf, ht


def _openood(hf, ht, k):
    ref = hf / (np.linalg.norm(hf, axis=1, keepdims=True) + 1e-10)
    n = ref.shape[0]
    kval = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    kval, kpos = kval[keep], kpos[keep]
    knndst = np.zeros((n, len(kpos)))
    for i in range(n):
        dst = np.sort(np.sum((ref[i] - ref) ** 2, axis=1))
        knndst[i] = dst[kpos + 1]
    feat = ht / (np.linalg.norm(ht, axis=1, keepdims=True) + 1e-10)
    out = []
    for v in feat:
        dst = np.sum((v - ref) ** 2, axis=1)
        count = (knndst >= dst[:, None]).sum(0) / n
        pos = np.nonzero(count >= k)[0]
        out.append(-(kval[pos[0]] if pos.size else 1.0))
    return np.array(out)


@pytest.mark.parametrize("k", [0.01, 0.05, 0.2])
def test_cfood_matches_openood(setup, k):
    model, loader, xt, hf, ht = setup
    det = normscore.create("cfood", k=k).fit(model, loader, calibration=0.0)
    ours = det.score(xt).double().numpy()
    ref = _openood(hf, ht, k)
    assert det.bank_.shape[0] == 300
    # kappa is a grid value: equal up to float32 rounding of the stored k-NN radii
    agree = np.isclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert agree.all(), (agree.mean(), ours[~agree], ref[~agree])
    assert np.unique(ours).size > 3


def test_cfood_alpha_subsamples_the_reference_set_independently_of_batching(setup):
    model, loader, xt, _hf, _ht = setup
    a = normscore.create("cfood", alpha=0.5).fit(model, loader, calibration=0.0)
    b = normscore.create("cfood", alpha=0.5).fit(model, [torch.cat(loader)], calibration=0.0)
    assert 100 < a.bank_.shape[0] < 200
    assert torch.equal(a.bank_, b.bank_) and torch.equal(a.score(xt), b.score(xt))


def test_cfood_needs_two_references(setup):
    model, loader, *_ = setup
    with pytest.raises(InputError, match="at least 2"):
        normscore.create("cfood").fit(model, [loader[0][:1]], calibration=0.0)
