"""NCI: the neural-collapse inspired score (Liu & Qin, CVPR 2025)."""

from __future__ import annotations

import torch

from ..taps import CaptureSpec, Features
from ._zoo import FeatureMean
from .base import Detector
from .constraints import Interval
from .registry import register

__all__ = ["NCI"]


@register
class NCI(Detector):
    """NCI: alignment of the centred feature with the predicted class's weight, plus an L1 norm.

    ``score = w_ŷ . (h - mu) / ||h - mu||_2 + alpha ||h||_1`` with ``ŷ = argmax z``, ``w_c`` the
    head's (unnormalised) weight row and ``mu`` the mean penultimate feature of the ID fit data.
    Liu & Qin, "Detecting Out-of-Distribution Through the Lens of Neural Collapse", CVPR 2025,
    arXiv:2311.01479 (code github litianliu/NCI-OOD; OpenOOD ``nci_postprocessor.py``).

    Default ``alpha = 1e-4`` (OpenOOD's ``nci.yml``, search space its sweep plus 0); pytorch-ood
    0.4's ``NCI`` has the same formula with default ``alpha = 0`` (no norm term) and returns
    ``-score``. ``mu`` is streamed in float64; the head is copied at fit time. A feature equal
    to ``mu`` gets alignment 0 (the denominator is clamped at 1e-12).
    """

    name = "nci"
    paper = "Liu & Qin, CVPR 2025, arXiv:2311.01479"
    formula = "w_yhat . (h - mu) / ||h - mu|| + alpha ||h||_1, yhat = argmax z, mu = ID mean of h"
    needs_fit = True
    constraints = {"alpha": Interval(0.0, float("inf"))}
    search_space = {"alpha": [0.0, 0.0001, 0.001, 0.01, 0.1]}

    def __init__(self, alpha: float = 0.0001) -> None:
        super().__init__()
        self.alpha = alpha

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True, penultimate=True)

    _fit_state = (("_mean", "merge"),)

    def _fit_begin(self, adapter) -> None:
        self._adapter_fit = adapter
        self._mean = FeatureMean(self.name)

    def _fit_update(self, feats: Features) -> None:
        self._mean.update(feats)

    def _fit_end(self) -> None:
        self.mean_ = self._mean.mean().float()
        self.W_ = self._adapter_fit.head_weight_bias()[0]
        del self._mean, self._adapter_fit

    def score_features(self, feats: Features) -> torch.Tensor:
        h = feats.require("penultimate").float()
        pred = feats.require("logits").argmax(dim=1).to(h.device)
        c = h - self.mean_.to(h.device)
        w = self.W_.to(h.device)[pred]
        align = (w * c).sum(dim=1) / c.norm(dim=1).clamp_min(1e-12)
        return align + float(self.alpha) * h.abs().sum(dim=1)
