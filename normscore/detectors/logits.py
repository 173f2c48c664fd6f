"""Scores computed from the logits alone."""

from __future__ import annotations

import torch

from ..taps import CaptureSpec, Features
from .base import Detector, Interval, register


@register
class MSP(Detector):
    """Maximum softmax probability: ``max_c softmax(z)_c``.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples in Neural Networks", ICLR 2017, arXiv:1610.02136.
    """

    name = "msp"
    paper = "Hendrycks & Gimpel, ICLR 2017, arXiv:1610.02136"
    formula = "max_c softmax(z)_c"

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        return torch.softmax(feats.require("logits").float(), dim=1).amax(dim=1)


@register
class MaxLogit(Detector):
    """Maximum logit: ``max_c z_c``.

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
    ICML 2022, arXiv:1911.11132.
    """

    name = "maxlogit"
    paper = "Hendrycks et al., ICML 2022, arXiv:1911.11132"
    formula = "max_c z_c"

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        return feats.require("logits").float().amax(dim=1)


@register
class Energy(Detector):
    """Negative free energy: ``T * logsumexp(z / T)``.

    Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020, arXiv:2010.03759.
    """

    name = "energy"
    paper = "Liu et al., NeurIPS 2020, arXiv:2010.03759"
    formula = "T * logsumexp(z / T)"
    constraints = {"temperature": Interval(0.0, float("inf"), closed="neither")}
    search_space = {"temperature": [0.5, 1.0, 2.0, 5.0, 10.0]}

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        t = float(self.temperature)
        return t * torch.logsumexp(feats.require("logits").float() / t, dim=1)
