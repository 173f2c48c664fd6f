"""ViM's residual alone (OpenOOD ``residual_postprocessor.py``)."""

from __future__ import annotations

import torch

from ..taps import CaptureSpec, Features
from .distances import ViM
from .registry import register

__all__ = ["Residual"]


@register
class Residual(ViM):
    """Residual: ``-|(h - o) P_perp|``, the norm of ``h`` outside the principal subspace.

    ``o = -pinv(W) b`` is the origin of the head's logit space and ``P_perp`` spans the
    eigenvectors of ``E[(h - o)(h - o)^T]`` beyond the ``dim`` principal ones: the virtual-logit
    term of :class:`~normscore.detectors.distances.ViM` without the energy and the scale
    ``alpha``. Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching",
    CVPR 2022, arXiv:2203.10807 (its "Residual" baseline); OpenOOD v1.5 ``residual``.

    Implementation: ViM's fitted state (streamed float64 second moment about ``o``, all
    eigenvectors kept), so ``dim`` changes without a refit; ``dim=None`` is ViM's rule (1000
    for D >= 2048, 512 for D >= 768, D/2 below), OpenOOD's config uses 512. OpenOOD fits on its
    ID validation split; normscore fits on the loader given. Scoring needs only ``h``.
    """

    name = "residual"
    paper = "Wang, Li, Feng & Zhang, CVPR 2022, arXiv:2203.10807"
    formula = "-|(h - o) P_perp|, o = -pinv(W) b, P_perp = eigenvectors beyond the dim principal ones"

    def capture_spec(self, adapter, stage):
        # the fit shares ViM's statistics (its max-logit mean needs the logits; unused here)
        return CaptureSpec(logits=stage == "fit", penultimate=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        return (-self.residual(feats.require("penultimate"))).float()
