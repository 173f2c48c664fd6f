"""Mahalanobis++ and RMDS++: the Gaussian scores on L2-normalised penultimate features
(Müller & Hein, ICML 2025, arXiv:2505.18032)."""

from __future__ import annotations

import torch

from ..taps import Features
from .distances import Mahalanobis, RelativeMahalanobis
from .registry import register

__all__ = ["MahalanobisPP", "RelativeMahalanobisPP"]


def _unit(h: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm, in float64 (zero rows stay zero)."""
    h = h.double()
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-300)


@register
class MahalanobisPP(Mahalanobis):
    """Mahalanobis++: :class:`~normscore.detectors.distances.Mahalanobis` on ``h / |h|``.

    ``-min_c (u - mu_c)^T Sigma^-1 (u - mu_c)`` with ``u = h / |h|``; the class means ``mu_c``
    and the shared covariance ``Sigma`` are fitted on the normalised fit features too. Müller &
    Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization", ICML 2025,
    arXiv:2505.18032 (code: github mueller-mp/maha-norm, ``mdsn_postprocessor.py``). The
    paper's point: the norms of pre-trained features vary strongly and break the shared-Gaussian
    assumption; on the unit sphere they do not.

    Implementation: exactly :class:`Mahalanobis` (streamed float64 class moments, relative
    ``shrinkage``, pseudo-inverse of a singular covariance) after normalising each row in
    float64; the official code normalises in float32 and inverts with scikit-learn's
    ``EmpiricalCovariance`` (``pinvh``), which is ``shrinkage=0``. With ``layer=`` (see
    :mod:`normscore.detectors.layer`) ``h`` is the chosen layer's feature vector (the
    concatenation for ``layer_aggregation="concat"``), normalised as a whole.
    """

    name = "mahalanobis_pp"
    paper = "Müller & Hein, ICML 2025, arXiv:2505.18032"
    formula = "-min_c (u - mu_c)^T Sigma^-1 (u - mu_c), u = h/|h| (fit on normalised features too)"

    def layer_features(self, feats: Features) -> torch.Tensor:
        return _unit(super().layer_features(feats))


@register
class RelativeMahalanobisPP(RelativeMahalanobis):
    """RMDS++: :class:`~normscore.detectors.distances.RelativeMahalanobis` on ``h / |h|``.

    ``-min_c [MD_c(u) - MD_0(u)]`` with ``u = h / |h|``; class Gaussians (shared covariance)
    and the class-agnostic Gaussian are fitted on the normalised fit features. Müller & Hein,
    ICML 2025, arXiv:2505.18032 (code: github mueller-mp/maha-norm, ``rmdsn_postprocessor.py``).
    Implementation as :class:`MahalanobisPP`.
    """

    name = "rmds_pp"
    paper = "Müller & Hein, ICML 2025, arXiv:2505.18032"
    formula = "-min_c [MD_c(u) - MD_0(u)], u = h/|h| (fit on normalised features too)"

    def layer_features(self, feats: Features) -> torch.Tensor:
        return _unit(super().layer_features(feats))
