"""GradNorm: the gradient-norm score in closed form from one forward pass (no backward pass)."""

from __future__ import annotations

import math

import torch

from ..taps import CaptureSpec, Features
from .base import Detector
from .constraints import Interval
from .registry import register

__all__ = ["GradNorm"]


@register
class GradNorm(Detector):
    """GradNorm in closed form (Huang, Geng & Li, NeurIPS 2021, arXiv:2110.00218).

    GradNorm is the L1 norm of the gradient, with respect to the last-layer weights ``W``, of
    the cross-entropy between ``softmax(z / T)`` and the uniform distribution. With
    ``z = W h + b``: ``dL/dW = ((p - 1/C) / T) h^T``, so the L1 norm of that outer product is::

        GradNorm(x) = || softmax(z/T) - 1/C ||_1 * || h ||_1 / T        (higher = more ID)

    computed from the logits and the penultimate features: no backward pass, and it works on
    cached features. The official code uses a target of all ones (``C`` times our uniform
    target), which scales every score by ``C`` and leaves rankings unchanged.
    """

    name = "gradnorm"
    shape_bound = frozenset()  # closed form without the head: logits/features of any width
    paper = "Huang et al., NeurIPS 2021, arXiv:2110.00218"
    formula = "||softmax(z/T) - 1/C||_1 * ||h||_1 / T"
    constraints = {"temperature": Interval(0.0, math.inf, closed="neither")}
    search_space = {"temperature": [0.5, 1.0, 2.0, 5.0]}

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True, penultimate=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        z = feats.require("logits").float()
        h = feats.require("penultimate").float()
        t = float(self.temperature)
        p = torch.softmax(z / t, dim=1)
        return (p - 1.0 / z.shape[1]).abs().sum(1) * h.abs().sum(1) / t
