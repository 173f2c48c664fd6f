"""pNML: the single-layer predictive normalized maximum likelihood regret."""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ..taps import CaptureSpec, Features
from .base import Detector
from .registry import register

__all__ = ["PNML"]


def _unit_rows64(h: torch.Tensor) -> torch.Tensor:
    h = h.double()
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-300)


@register
class PNML(Detector):
    """Single-layer pNML regret: ``-log(sum_c p_c / (p_c + (1 - p_c) p_c^g)) / log C``.

    ``z = h / |h|`` are the L2-normalised penultimate features, ``p = softmax(W z + b)`` the head
    applied to them, ``g = z^T (X^T X)^+ z / (1 + z^T (X^T X)^+ z)`` with ``X`` the normalised fit
    features (one row per sample). The regret is ``log(sum_c ...) / log C`` (in ``[0, 1]``,
    high = OOD); the score is its negative. Bibas, Feder & Hassner, "Single Layer Predictive
    Normalized Maximum Likelihood for Out-of-Distribution Detection", NeurIPS 2021,
    arXiv:2110.09246 (official code kobybibas/pnml_ood_detection; pytorch-ood ``PNML``).

    Implementation: ``X^T X`` is a streamed float64 ``D x D`` sum (no bank; a ``"sum"`` fit state
    under ``torch.distributed``), inverted once with a Hermitian pseudo-inverse (equal to the
    inverse the official code takes when ``X^T X`` is non-singular). The head and the fit use all
    fit samples (no labels), as both peers do. Each term is evaluated as
    ``sigmoid(-(log(1 - p_c) + (g - 1) log p_c))`` from ``log_softmax`` in float64, which equals the
    formula but stays finite where ``p_c`` underflows (pytorch-ood clamps ``p`` to
    ``[1e-12, 1 - 1e-12]`` instead; the official code does not clamp).
    """

    name = "pnml"
    paper = "Bibas, Feder & Hassner, NeurIPS 2021, arXiv:2110.09246"
    formula = "-log(sum_c p_c/(p_c + (1-p_c) p_c^g))/log C, p = softmax(W z + b), z = h/|h|, g = z'Gz/(1+z'Gz)"
    needs_fit = True

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=False, penultimate=True)

    _fit_state = (("_gram", "sum"),)

    def _fit_begin(self, adapter) -> None:
        self._adapter_fit = adapter
        self._gram: torch.Tensor | None = None

    def _fit_update(self, feats: Features) -> None:
        z = _unit_rows64(feats.require("penultimate"))
        g = z.T @ z
        self._gram = g if self._gram is None else self._gram + g

    def _fit_end(self) -> None:
        if self._gram is None:
            raise InputError("pnml saw no fit samples.")
        gram = 0.5 * (self._gram + self._gram.T)
        self.projector_ = torch.linalg.pinv(gram, hermitian=True)
        w, b = self._adapter_fit.head_weight_bias()
        self.W_, self.b_ = w.double(), b.double()
        del self._gram, self._adapter_fit

    def regret(self, h: torch.Tensor) -> torch.Tensor:
        """The pNML regret ``[B]`` (float64, high = OOD)."""
        dev = self.projector_.device
        z = _unit_rows64(h.to(dev))
        quad = ((z @ self.projector_) * z).sum(1)
        g = quad / (1.0 + quad)
        logp = torch.log_softmax(z @ self.W_.to(dev).T + self.b_.to(dev), dim=1)
        log1mp = torch.log1p(-logp.exp())
        terms = torch.sigmoid(-(log1mp + (g[:, None] - 1.0) * logp))
        return torch.log(terms.sum(1)) / math.log(logp.shape[1])

    def score_features(self, feats: Features) -> torch.Tensor:
        return (-self.regret(feats.require("penultimate"))).float()
