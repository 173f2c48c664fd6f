"""LTS: logit scaling by the activation-mass ratio of the top fraction of the penultimate features."""

from __future__ import annotations

import torch

from ..taps import CaptureSpec, Features
from .base import Detector
from .constraints import Interval
from .registry import register
from .shaping import _kept, _ratio

__all__ = ["LTS"]


@register
class LTS(Detector):
    """LTS: energy of the logits scaled by ``S = (s1 / s2)^2``.

    With ``r = ReLU(h)``, ``s1 = sum(r)``, ``s2`` the sum of the ``K = D - round(D p / 100)``
    largest entries of ``r`` (at least 1), the score is ``logsumexp(S (W h + b))``. Djurisic,
    Liu & Nikolić, "Logit Scaling for Out-of-Distribution Detection", Machine Vision and
    Applications 2025, arXiv:2409.01175 (official code github andrijazz/lts, function ``lts``).

    Default ``p = 95`` is pytorch-ood 0.4's ``LTS(p=0.05)`` (p there is the kept *fraction*,
    ``1 - p/100`` here); the official code takes ``p`` from its command line (its function
    default is 65). As in the official code and pytorch-ood the ReLU enters only ``S``: the
    head gets the unchanged ``h``, so the logits are the model's own and LTS joins the shared
    pass with the logits and penultimate features. Fit-free; an all-zero ``r`` gives ``S = 0``.
    """

    name = "lts"
    paper = "Djurisic, Liu & Nikolić, Machine Vision and Applications 2025, arXiv:2409.01175"
    formula = "logsumexp(S z), S = (sum ReLU(h) / sum of top-(100-p)% of ReLU(h))^2"
    constraints = {"percentile": Interval(0.0, 100.0, closed="left")}
    search_space = {"percentile": [65, 70, 75, 80, 85, 95]}

    def __init__(self, percentile: float = 95.0) -> None:
        super().__init__()
        self.percentile = percentile

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True, penultimate=True)

    def scaling(self, h: torch.Tensor) -> torch.Tensor:
        """``S`` of ``[B, D]`` features, ``[B]``."""
        r = torch.relu(h.float())
        k = _kept(r.shape[1], self.percentile)
        s1 = r.sum(dim=1)
        s2 = torch.topk(r, k, dim=1).values.sum(dim=1)
        return _ratio(s1, s2).square()

    def score_features(self, feats: Features) -> torch.Tensor:
        z = feats.require("logits").float()
        return torch.logsumexp(z * self.scaling(feats.require("penultimate"))[:, None], dim=1)
