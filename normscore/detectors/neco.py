"""NECO: the share of a (standardised) feature's norm inside the ID principal subspace."""

from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..stats import RunningMoments
from ..taps import Features
from .base import Detector
from .constraints import OneOf
from .distances import _DimConstraint, _eig_desc
from .layer import LayerFeatures
from .registry import register

__all__ = ["NECO"]


@register
class NECO(LayerFeatures, Detector):
    """NECO: ``||P_d x|| / ||x||``, optionally times the max logit.

    ``x = (h - m) / s`` is the feature standardised with the ID mean ``m`` and standard
    deviation ``s`` (sklearn's ``StandardScaler``: population std, 1 where it is 0); ``P_d``
    projects on the ``d`` leading principal directions of the standardised ID features (PCA,
    i.e. the eigenvectors of the ID correlation matrix). With ``maxlogit=True`` the ratio is
    multiplied by ``max_c z_c``. Ben Ammar, Belkhir, Popescu, Manzanera & Franchi, "NECO:
    NEural Collapse Based Out-of-distribution Detection", ICLR 2024, arXiv:2310.06823 (official
    code github MouinBenAmmar/NECO, function ``neco`` of ``test_all_ood.py``).

    Defaults follow the official code's ResNet path: ``standardize=True``, ``maxlogit=False``
    (the official code multiplies by the max logit for every architecture except ResNets, and
    for DeiT/Swin divides by the norm of the *raw* feature; that last special case is not
    offered). ``dim``: the official code has no default (``--neco_dim`` is required); ``None``
    here is ``min(C - 1, D - 1)`` (the dimension of the class simplex the features collapse to
    under neural collapse), an integer is a number of dimensions, a float in (0, 1) a fraction
    of D (the search space uses fractions so it fits any model). ``standardize=False`` is the
    official code's hint for ViTs with well separated classes: PCA of the raw features, the
    numerator centred by the ID mean (sklearn's PCA centres) and the denominator the raw norm
    ``||h||``, as in the official code; it is fixed at fit time (changing it raises until you
    refit).

    Streamed fit: count, mean and scatter matrix in float64 (:class:`~normscore.stats.
    RunningMoments`); the correlation (or covariance) matrix is diagonalised once and all
    eigenvectors kept (``eigvecs_``, D x D float64), so ``dim`` changes without a refit. The ID mean of the standardised
    features, which sklearn's PCA subtracts, is zero by construction and not subtracted.
    """

    name = "neco"
    paper = "Ben Ammar et al., ICLR 2024, arXiv:2310.06823"
    formula = "||P_d x|| / ||x||, x = standardised h, P_d = top-d PCA of ID x (x max_c z_c optional)"
    needs_fit = True
    constraints = {"dim": _DimConstraint(), "maxlogit": OneOf((False, True)), "standardize": OneOf((True, False))}
    search_space = {"dim": [0.1, 0.25, 0.5, 0.75, 0.9], "maxlogit": [False, True]}

    def __init__(
        self,
        dim: int | float | None = None,
        maxlogit: bool = False,
        standardize: bool = True,
        layer: str | list[str] = "penultimate",
        layer_aggregation: str = "concat",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.maxlogit = maxlogit
        self.standardize = standardize
        self.layer = layer
        self.layer_aggregation = layer_aggregation

    def capture_spec(self, adapter, stage):
        return self.layer_spec(adapter, logits=True)

    def principal_dim(self, d: int) -> int:
        """The principal-subspace dimension for features of dimension ``d``."""
        v = self.dim
        if v is None:
            return max(1, min(int(self.num_classes_) - 1, d - 1))
        if 0 < v < 1:
            return min(max(1, round(v * d)), d)
        if int(v) > d:
            raise ConfigError(f"neco: dim={v} must not exceed the feature dimension {d}.")
        return int(v)

    _fit_state = (("_moments", "moments"),)

    def _fit_begin(self, adapter) -> None:
        self._moments: RunningMoments | None = None
        self._classes = 0

    def _fit_update(self, feats: Features) -> None:
        h = self.layer_features(feats)
        if self._moments is None:
            self._moments = RunningMoments(h.shape[1], device=h.device)
            self._classes = int(feats.require("logits").shape[1])
        self._moments.update(h)

    def _fit_end(self) -> None:
        m = self._moments
        if m is None or m.n == 0:
            raise InputError("neco saw no fit samples.")
        cov = m.covariance()  # population covariance, as StandardScaler's variance
        std = cov.diagonal().sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        self.mean_ = m.mean
        self.std_ = std
        self.num_classes_ = self._classes
        self.fit_standardize_ = bool(self.standardize)
        self.eigvecs_ = _eig_desc(cov / torch.outer(std, std) if self.standardize else cov)[1]
        del self._moments, self._classes

    def ratio(self, h: torch.Tensor) -> torch.Tensor:
        """``||P_d (x - mean)|| / ||x||`` in float64, ``[B]`` (``x`` standardised or raw)."""
        if bool(self.standardize) != self.fit_standardize_:
            raise ConfigError(
                f"neco: standardize was changed to {self.standardize} after fitting with "
                f"standardize={self.fit_standardize_}; the principal directions depend on it. Refit the detector."
            )
        vecs = self.eigvecs_
        d = self.principal_dim(vecs.shape[0])
        p = self._memo("principal", (vecs, d), lambda: vecs[:, :d].contiguous())
        h = h.double().to(p.device)
        c = h - self.mean_
        if self.standardize:  # the standardised ID mean is 0: numerator and denominator share x
            x = c / self.std_
            return (x @ p).norm(dim=1) / x.norm(dim=1).clamp_min(1e-300)
        # raw features (official code without the scaler): PCA centres, the denominator does not
        return (c @ p).norm(dim=1) / h.norm(dim=1).clamp_min(1e-300)

    def score_features(self, feats: Features) -> torch.Tensor:
        r = self.ratio(self.layer_features(feats))
        if self.maxlogit:
            r = r * feats.require("logits").double().amax(dim=1).to(r.device)
        return r.float()
