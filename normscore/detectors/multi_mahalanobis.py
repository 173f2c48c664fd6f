"""Mahalanobis over several layers, weighted (Lee et al., NeurIPS 2018; pytorch-ood
``MultiMahalanobis``, OpenOOD ``mds_ensemble`` without input pre-processing)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..stats import ClassMoments
from ..taps import STAGE_ENDS, CaptureSpec, Features, block_key
from ._zoo import check_labels
from .base import Detector
from .constraints import Constraint, Interval
from .distances import _eig_desc, _sq_dists, _whitener
from .registry import register

__all__ = ["MultiMahalanobis"]

#: the block reduction: mean over spatial positions (patch tokens), as pytorch-ood and OpenOOD pool
_RED = "gap"


class _Names(Constraint):
    def check(self, name: str, value: Any) -> None:
        if value is None:
            return
        if (
            not isinstance(value, (list, tuple))
            or not value
            or not all(isinstance(v, str) and v for v in value)
            or len(set(value)) != len(value)
        ):
            raise ConfigError(
                f"hyperparameter {name}={value!r} must be None (the last block of every stage) or a non-empty list of "
                "distinct block names (see normscore.get_adapter(model).block_names)."
            )


class _Weights(Constraint):
    def check(self, name: str, value: Any) -> None:
        if value is None:
            return
        ok = isinstance(value, (list, tuple)) and value
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok:
            raise ConfigError(
                f"hyperparameter {name}={value!r} must be None (weight 1 for every layer) or a list of finite "
                "numbers, one per layer."
            )


def _layer_moments(n: int) -> Any:
    """A holder of ``n`` :class:`~normscore.stats.ClassMoments` (``m0``, ``m1``, ...) that declares
    one ``"moments"`` fit state per layer (a ``"merge"`` state of the detector)."""
    cls = type("_LayerMoments", (), {"_fit_state": tuple((f"m{i}", "moments") for i in range(n))})
    return cls()


@register
class MultiMahalanobis(Detector):
    """Weighted sum of per-layer Mahalanobis scores: ``-sum_l a_l min_c (f_l - mu_lc)^T
    Sigma_l^-1 (f_l - mu_lc)``.

    ``f_l`` is block ``l``'s output averaged over spatial positions (patch tokens for token
    layouts), ``mu_lc`` its class means and ``Sigma_l`` its covariance shared by the classes,
    fitted with labels as :class:`~normscore.detectors.distances.Mahalanobis`. Lee, Lee, Lee &
    Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018, arXiv:1807.03888 (the feature ensemble, without input
    pre-processing: see ``mahalanobis_odin``); pytorch-ood 0.4 ``MultiMahalanobis``; OpenOOD
    v1.5 ``mds_ensemble`` (with ``noise=0``).

    ``layers``: block names (``None``: the last candidate block of every stage,
    :attr:`~normscore.adapters.Adapter.stage_ends`, e.g. the outputs of a ResNet's four stages
    as in OpenOOD's MDSEns). ``weights``: one weight ``a_l`` per layer (``None``: 1 for every layer,
    pytorch-ood's default). The paper (and OpenOOD without ``alpha_list``) fits the weights by
    logistic regression on validation *OOD* data; normscore does not use OOD data by default:
    pass weights explicitly to reproduce such a setting.

    Implementation: one streamed float64 :class:`~normscore.stats.ClassMoments` per layer, all
    blocks pooled in the shared forward pass (``"gap"`` block reduction); per layer the
    relative ``shrinkage`` and pseudo-inverse of ``mahalanobis`` and one whitening GEMM at score
    time. pytorch-ood's covariance is the within-class scatter without the ``1/N`` (plus a 1e-6
    ridge) and its per-layer score is half the distance: the same ranking for uniform weights.
    """

    name = "multi_mahalanobis"
    paper = "Lee et al., NeurIPS 2018, arXiv:1807.03888"
    formula = "-sum_l a_l min_c (f_l - mu_lc)^T Sigma_l^-1 (f_l - mu_lc), f_l = spatial mean of block l"
    needs_labels = True
    per_class = True
    needs_fit = True
    constraints = {"layers": _Names(), "weights": _Weights(), "shrinkage": Interval(0.0, 1.0)}
    search_space = {"shrinkage": [0.0, 0.01, 0.1]}

    def __init__(
        self,
        layers: list[str] | tuple[str, ...] | None = None,
        weights: list[float] | tuple[float, ...] | None = None,
        shrinkage: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = layers
        self.weights = weights
        self.shrinkage = shrinkage

    def capture_spec(self, adapter, stage):
        names = getattr(self, "layers_", None) if stage != "fit" else None
        if names is None:
            names = [STAGE_ENDS] if self.layers is None else list(self.layers)
        return CaptureSpec(logits=stage == "fit", blocks=frozenset((n, _RED) for n in names))

    # ------------------------------------------------------------------ fit
    _fit_state = (("_moments", "merge"),)

    def _fit_begin(self, adapter) -> None:
        self._fit_adapter = adapter
        self._moments: Any = None
        self._names: list[str] = []

    def _fit_update(self, feats: Features) -> None:
        c = feats.require("logits").shape[1]
        if self._moments is None:
            names = list(self._fit_adapter.stage_ends) if self.layers is None else list(self.layers)
            if not names:
                raise InputError(
                    "multi_mahalanobis: the model has no candidate blocks; pass layers=[...] or an "
                    "adapter with blocks (normscore.Adapter(model, blocks=[...]))."
                )
            self._names = names
            self._moments = _layer_moments(len(names))
            for i, n in enumerate(names):
                f = feats.require(block_key(n, _RED))
                setattr(self._moments, f"m{i}", ClassMoments(c, f.shape[1], device=f.device))
        y = None
        for i, n in enumerate(self._names):
            f = feats.require(block_key(n, _RED))
            if y is None:
                y = check_labels(feats["labels"].to(f.device), c, self.name)
            getattr(self._moments, f"m{i}").update(f, y)

    def _fit_end(self) -> None:
        holder, names = self._moments, self._names
        del self._moments, self._names, self._fit_adapter
        if holder is None:
            raise InputError(f"{self.name} saw no fit samples.")
        ms = [getattr(holder, f"m{i}") for i in range(len(names))]
        if ms[0].n == 0:
            raise InputError(f"{self.name} saw no fit samples.")
        self._check_weights(len(names))
        present = ms[0].counts > 0
        means, vals, vecs = [], [], []
        for m in ms:
            e, v = _eig_desc(m.within_scatter() / m.n)
            means.append(m.means()[present])
            vals.append(e)
            vecs.append(v.flatten())
        self.layers_ = names
        self.layer_dims_ = [int(m.dim) for m in ms]
        self.present_ = present
        self.class_means_ = torch.cat(means, dim=1)  # [C', sum D_l]
        self.cov_eigvals_ = torch.cat(vals)  # [sum D_l]
        self.cov_eigvecs_ = torch.cat(vecs)  # [sum D_l^2]

    def _check_weights(self, n: int) -> None:
        if self.weights is not None and len(self.weights) != n:
            raise ConfigError(
                f"multi_mahalanobis: {len(self.weights)} weights for {n} layers {getattr(self, 'layers_', '')}; "
                "give one weight per layer (or weights=None)."
            )

    # ------------------------------------------------------------------ score
    def _layer_terms(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Cached per layer: ``(P, class means, whitened class means, their squared norms)``."""

        def build():
            out = []
            o1 = o2 = 0
            for d in self.layer_dims_:
                vecs = self.cov_eigvecs_[o2 : o2 + d * d].reshape(d, d)
                p = _whitener(self.cov_eigvals_[o1 : o1 + d], vecs, self.shrinkage)
                mu = self.class_means_[:, o1 : o1 + d]
                ref = mu.mean(0)  # distances are translation invariant; centring limits cancellation
                wm = (mu - ref) @ p
                out.append((p, ref, wm, (wm * wm).sum(1)))
                o1, o2 = o1 + d, o2 + d * d
            return out

        return self._memo("layers", (self.cov_eigvecs_, self.class_means_, float(self.shrinkage)), build)

    def layer_sq_distances(self, feats: Features) -> torch.Tensor:
        """``min_c`` squared Mahalanobis distance per layer, ``[B, L]`` (float64)."""
        cols = []
        for name, (p, ref, wm, wm_sq) in zip(self.layers_, self._layer_terms()):
            f = feats.require(block_key(name, _RED)).double().to(p.device)
            z = (f - ref) @ p
            cols.append(_sq_dists(z, wm, wm_sq).amin(dim=1))
        return torch.stack(cols, dim=1)

    def score_features(self, feats: Features) -> torch.Tensor:
        self._check_weights(len(self.layers_))
        d2 = self.layer_sq_distances(feats)
        w = torch.ones(d2.shape[1], dtype=d2.dtype) if self.weights is None else torch.tensor(self.weights)
        return (-(d2 @ w.double().to(d2.device))).float()
