"""Feature-norm scores."""

from __future__ import annotations

import torch

from ..taps import CaptureSpec, Features
from .base import Detector
from .registry import register


@register
class PenultimateNorm(Detector):
    """L2 norm of the pooled penultimate (pre-logit) features: ``||h(x)||_2``.

    This is the test-time score of RNA: the representation norm *before* any projection
    head, i.e. the input of the classifier's linear layer. Shin & Chung, "Representation Norm
    Amplification for Out-of-Distribution Detection in Long-Tail Learning", TMLR 2024,
    arXiv:2408.10676.
    """

    name = "penultimate_norm"
    shape_bound = frozenset()  # the score works on logits/features of any width
    paper = "Shin & Chung, TMLR 2024, arXiv:2408.10676"
    formula = "||h||_2, h = pooled pre-logit features"

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=False, penultimate=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        return feats.require("penultimate").float().norm(dim=1)
