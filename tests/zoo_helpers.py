"""Helpers for the detector-zoo tests: a model whose penultimate features *are* its input, and
synthetic Gaussian data, so every detector can be checked against a closed-form reference."""

from __future__ import annotations

import torch
from torch import nn

import normscore
from normscore.taps import CaptureSpec, Features

#: the zoo of issue 4
ZOO = [
    "entropy",
    "gen",
    "tempscale",
    "odin",
    "klm",
    "mahalanobis",
    "rmds",
    "knn",
    "vim",
    "react",
    "ash",
    "scale",
    "dice",
    "she",
    "nnguide",
    "fdbd",
]

#: hyperparameters for fits on a handful of samples (the defaults need banks of >= 50 / 100 rows)
SMALL_DATA_HPARAMS = {"knn": {"k": 3}, "nnguide": {"k": 3, "alpha": 1.0}}
# mcd: the test models (TinyCNN, ...) have no dropout modules, so the generic matrices run the
# OpenOOD-style dropout on the penultimate features; where="model" is tested on a model with dropout
SMALL_DATA_HPARAMS["mcd"] = {"where": "head", "samples": 5}


def create_small(name: str, **kw) -> normscore.Detector:
    return normscore.create(name, **{**SMALL_DATA_HPARAMS.get(name, {}), **kw})


class FeatNet(nn.Module):
    """``x [B, D, 1, 1] -> h = act(flatten(x)) -> logits = fc(h)``: the penultimate features are
    (a ReLU of) the input, so tests control ``h`` exactly."""

    def __init__(self, dim: int = 16, classes: int = 4, relu: bool = True, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.fc = nn.Linear(dim, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, dim, generator=g) / dim**0.5)
            self.fc.bias.copy_(0.1 * torch.randn(classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(x.flatten(1)))


def gaussians(n: int, dim: int, classes: int, *, sep: float = 3.0, seed: int = 0, offset: float = 1.0):
    """Class-conditional Gaussians: ``x = mu_y + A eps`` with a random shared ``A``.

    Returns inputs ``[n, dim, 1, 1]`` and labels.
    """
    g = torch.Generator().manual_seed(seed)
    mu = sep * torch.randn(classes, dim, generator=g) + offset
    a = torch.randn(dim, dim, generator=g) / dim**0.5 + 0.5 * torch.eye(dim)
    y = torch.randint(0, classes, (n,), generator=g)
    x = mu[y] + torch.randn(n, dim, generator=g) @ a.T
    return x[:, :, None, None], y


def loader_of(x: torch.Tensor, y: torch.Tensor | None = None, batch: int = 64) -> list:
    if y is None:
        return [x[i : i + batch] for i in range(0, x.shape[0], batch)]
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0], batch)]


def features_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> Features:
    """Logits, penultimate features and input of ``x`` (resolves the model's adapter)."""
    f = normscore.capture(normscore.get_adapter(model), x, CaptureSpec(logits=True, penultimate=True, input=True))
    if y is not None:
        f["labels"] = y
    return f


def fitted(name: str, model: nn.Module, feats: Features, **hp) -> normscore.Detector:
    """A detector fitted on cached features without calibration (the whole batch is the fit split)."""
    det = normscore.create(name, **hp).attach(model)
    if det.needs_fit:
        det.fit_features(feats, calibration=0.0)
    return det


def sign_scenario(seed: int = 0):
    """A clear-cut ID/OOD problem: ID features are ``4 e_c`` + noise for C = 4 classes in 16 dims,
    OOD features are small noise around the origin; the head is ``W = 2 [e_1..e_4]``, ``b = 0``.

    Returns ``(model, fit loader, id_x, ood_x)``.
    """
    dim, classes = 16, 4
    g = torch.Generator().manual_seed(seed)
    model = FeatNet(dim, classes)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[:, :classes] = 2.0 * torch.eye(classes)
        model.fc.bias.zero_()

    def id_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        x = 0.5 * torch.randn(n, dim, generator=g)
        x[torch.arange(n), y] += 4.0
        return x[:, :, None, None], y

    xf, yf = id_batch(400)
    # 10% label noise: a perfectly separable fit set would drive TempScale's T to its lower bound
    flip = torch.rand(400, generator=g) < 0.1
    yf = torch.where(flip, torch.randint(0, classes, (400,), generator=g), yf)
    xi, _ = id_batch(100)
    xo = (0.5 * torch.randn(100, dim, generator=g))[:, :, None, None]
    return model.eval(), loader_of(xf, yf), xi, xo
