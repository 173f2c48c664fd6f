"""GROOD against an independent float64 reference of OpenOOD's ``grood.py`` (pytorch-ood has no
GROOD): prototypes by label, the OOD prototype as the mean of the prototypes (``use_proto_mean``),
the per-sample autograd gradient of ``CE(-|h - p_j|, argmax z)`` w.r.t. the OOD prototype for the
correctly classified fit samples, and ``-`` the squared L2 distance to the nearest bank gradient
(exact search here; OpenOOD uses an IVF index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from zoo_helpers import FeatNet, features_of, fitted, gaussians

from normscore.errors import InputError

D, C = 12, 4


def _autograd_grads(h, protos, noise, labels=None):
    out = []
    for i in range(h.shape[0]):
        noise_ = noise.clone().requires_grad_(True)
        p = torch.cat([protos, noise_[None]])
        ncc = -torch.norm(h[i : i + 1, None, :] - p[None], dim=2)
        target = labels[i : i + 1] if labels is not None else ncc[:, :-1].argmax(1)
        (g,) = torch.autograd.grad(F.cross_entropy(ncc, target), [noise_])
        out.append(g)
    return torch.stack(out)


def test_grood_matches_the_openood_gradients_and_score():
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(300, D, C, seed=1, sep=1.0)
    xt, _ = gaussians(40, D, C, seed=2, sep=3.0)
    h = x.flatten(1).double()
    mu = torch.stack([h[y == c].mean(0) for c in range(C)])
    with torch.no_grad():
        model.fc.weight.copy_(0.3 * mu.float())
        model.fc.bias.copy_(-0.15 * (mu * mu).sum(1).float())
    fit, test = features_of(model, x, y), features_of(model, xt)
    det = fitted("grood", model, fit)
    hf = fit["penultimate"].double()
    protos = torch.stack([hf[y == c].mean(0) for c in range(C)])
    noise = protos.mean(0)
    pred = fit["logits"].argmax(1)
    ok = pred == y
    bank = _autograd_grads(hf[ok], protos, noise, pred[ok])
    ht = test["penultimate"].double()
    qg = _autograd_grads(ht, protos, noise, test["logits"].argmax(1))
    np.testing.assert_allclose(det.gradients(ht).numpy(), qg.numpy(), rtol=1e-9, atol=1e-12)
    ref = -torch.cdist(qg, bank).pow(2).amin(1)
    np.testing.assert_allclose(det.score_features(test).double().numpy(), ref.numpy(), rtol=1e-4, atol=1e-7)


def test_grood_without_correct_samples_says_so():
    model = FeatNet(D, C, relu=False).eval()
    x, y = gaussians(40, D, C, seed=3)
    f = features_of(model, x, y)
    f["labels"] = (f["logits"].argmax(1) + 1) % C
    with pytest.raises(InputError, match="none of the fit samples"):
        fitted("grood", model, f)
