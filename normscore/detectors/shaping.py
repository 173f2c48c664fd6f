"""Activation shaping: change the penultimate features ``h`` (or the head's weights), then score
with the energy ``logsumexp(W h' + b)``.

All four work on the pooled penultimate features and the head ``(W, b)`` captured once, so a
percentile sweep never re-runs the network. Percentile hyperparameters are applied at score
time (ReAct reads a stored quantile table, DICE re-masks lazily), so ``set_params`` needs no
refit. Designed for non-negative (post-ReLU) features, as in the papers.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..taps import CaptureSpec, Features
from ._zoo import (
    FeatureMean,
    LazyCache,
    RowSample,
    feature_positions,
    percentile_from_table,
    quantile_sorted,
    quantile_table,
    sample_rows_for,
)
from .base import Detector
from .constraints import Interval, OneOf
from .registry import register

__all__ = ["ASH", "DICE", "SCALE", "ReAct"]


def _head(det: Detector) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)``: the fitted copies when the detector has them, else the model's head."""
    w = getattr(det, "W_", None)
    if w is not None:
        return w, det.b_
    return det.adapter.head_weight_bias(copy=False)


def _energy_of(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(h @ w.to(h.device).T + b.to(h.device), dim=1)


def _kept(n: int, percentile: float) -> int:
    """Number of activations kept above the ``percentile``: ``n - round(n p / 100)`` (>= 1)."""
    n = int(n)  # a traced size (torch.jit.trace) is a tensor; D is fixed for a model
    return max(1, n - round(n * float(percentile) / 100.0))


def _ratio(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``s1 / s2``, defined as 0 for all-zero samples (whose shaped features are zero anyway)."""
    return torch.where(s2 != 0, s1 / torch.where(s2 != 0, s2, torch.ones_like(s2)), torch.zeros_like(s1))


def _top_mask(h: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries per row; ties broken by lower index (stable)."""
    order = torch.sort(h, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(h, dtype=torch.bool).scatter(1, order, torch.ones_like(order, dtype=torch.bool))


@register
class ReAct(Detector):
    """ReAct: energy after clipping the penultimate activations at the ``p``-th percentile ``c``
    of the ID activations: ``logsumexp(W min(h, c) + b)``.

    Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS
    2021, arXiv:2111.12797. Default p = 90 (the paper's).

    The percentile is over all activation values (samples x units) of the fit split. They are
    not kept: the fit keeps a uniform sample of at most ``2**22`` values (whole rows, chosen by a
    hash of the row's position, so the sample does not depend on the batch size; exact when the
    fit split has at most ``2**22 / D`` rows) and stores its quantile table at 0.01-percentile
    resolution (``activation_quantiles_``), so any percentile is read without refitting.
    """

    name = "react"
    paper = "Sun, Guo & Li, NeurIPS 2021, arXiv:2111.12797"
    formula = "logsumexp(W min(h, c) + b), c = p-th percentile of ID activations"
    needs_fit = True
    constraints = {"percentile": Interval(0.0, 100.0)}
    search_space = {"percentile": [80, 85, 90, 95, 99]}

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = percentile

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=False, penultimate=True)

    _fit_state = (("_sample", "merge"),)

    def _fit_begin(self, adapter) -> None:
        self._adapter_fit = adapter
        self._sample: RowSample | None = None

    def _fit_update(self, feats: Features) -> None:
        h = feats.require("penultimate").float()
        if self._sample is None:
            self._sample = RowSample(sample_rows_for(h.shape[1]), salt=1)
        self._sample.add(h, feature_positions(feats, self._sample.seen))

    def _fit_end(self) -> None:
        if self._sample is None:
            raise InputError("react saw no fit samples.")
        self.activation_quantiles_ = quantile_table(self._sample.rows())
        self.n_sampled_rows_ = int(self._sample.rows().shape[0])
        self.W_, self.b_ = self._adapter_fit.head_weight_bias()
        del self._sample, self._adapter_fit

    @property
    def threshold(self) -> float:
        """The clipping threshold ``c`` for the current ``percentile``."""
        table, p = self.activation_quantiles_, float(self.percentile)
        return self._memo("threshold", (table, p), lambda: percentile_from_table(table, p))

    def score_features(self, feats: Features) -> torch.Tensor:
        h = feats.require("penultimate").float()
        w, b = _head(self)
        return _energy_of(h.clamp(max=self.threshold), w, b)


@register
class ASH(Detector):
    """ASH: prune all but the top ``(100 - p)``% activations of each sample, then energy.

    Per sample, with ``K = D - round(D p / 100)`` kept units, ``s1 = sum(h)`` and ``s2`` the sum
    of the kept ones: ``ASH-P`` keeps them as they are, ``ASH-B`` sets each to ``s1 / K``,
    ``ASH-S`` multiplies them by ``exp(s1 / s2)``. Score ``logsumexp(W h' + b)``.

    Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for Out-of-Distribution
    Detection", ICLR 2023, arXiv:2209.09858. Defaults: ASH-S at p = 90 (the paper's ResNet-50
    setting), applied to the pooled penultimate features as in the paper. Fit-free; ties at
    the cut are broken by unit index.
    """

    name = "ash"
    paper = "Djurisic et al., ICLR 2023, arXiv:2209.09858"
    formula = "logsumexp(W h' + b), h' = top-(100-p)% of h: kept (p), s1/K (b) or * exp(s1/s2) (s)"
    constraints = {"percentile": Interval(0.0, 100.0, closed="left"), "variant": OneOf(("p", "b", "s"))}
    search_space = {"percentile": [65, 70, 75, 80, 85, 90, 95], "variant": ["p", "b", "s"]}

    def __init__(self, percentile: float = 90.0, variant: str = "s") -> None:
        super().__init__()
        self.percentile = percentile
        self.variant = variant

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=False, penultimate=True)

    def shape(self, h: torch.Tensor) -> torch.Tensor:
        """The shaped features ``h'`` of ``[B, D]`` features ``h``."""
        h = h.float()
        k = _kept(h.shape[1], self.percentile)
        mask = _top_mask(h, k)
        kept = h * mask
        if self.variant == "p":
            return kept
        s1 = h.sum(dim=1, keepdim=True)
        if self.variant == "b":
            return mask.to(h.dtype) * (s1 / k)
        s2 = kept.sum(dim=1, keepdim=True)
        return kept * torch.exp(_ratio(s1, s2))

    def score_features(self, feats: Features) -> torch.Tensor:
        w, b = _head(self)
        return _energy_of(self.shape(feats.require("penultimate")), w, b)


@register
class SCALE(Detector):
    """SCALE: rescale *all* activations by ``exp(s1 / s2)``, then energy.

    ``s1 = sum(h)``, ``s2`` = sum of the top ``(100 - p)``% activations of the sample (``K = D -
    round(D p / 100)`` units); score ``logsumexp(W h exp(s1 / s2) + b)``. Nothing is pruned.
    Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024, arXiv:2310.00227. Default p = 85 (OpenOOD's); fit-free.
    """

    name = "scale"
    paper = "Xu, Chen, Franchi & Yao, ICLR 2024, arXiv:2310.00227"
    formula = "logsumexp(W h exp(s1/s2) + b), s1 = sum h, s2 = sum of top-(100-p)% of h"
    constraints = {"percentile": Interval(0.0, 100.0, closed="left")}
    search_space = {"percentile": [65, 70, 75, 80, 85, 90, 95]}

    def __init__(self, percentile: float = 85.0) -> None:
        super().__init__()
        self.percentile = percentile

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=False, penultimate=True)

    def shape(self, h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        k = _kept(h.shape[1], self.percentile)
        s1 = h.sum(dim=1, keepdim=True)
        s2 = torch.topk(h, k, dim=1).values.sum(dim=1, keepdim=True)
        return h * torch.exp(_ratio(s1, s2))

    def score_features(self, feats: Features) -> torch.Tensor:
        w, b = _head(self)
        return _energy_of(self.shape(feats.require("penultimate")), w, b)


@register
class DICE(Detector):
    """DICE: energy of a sparsified head: ``logsumexp((W * M) h + b)``.

    ``M`` keeps the weights whose contribution ``V = W * mean_ID(h)`` (per class and unit) is
    above the ``p``-th percentile of all ``C x D`` contributions. Sun & Li, "DICE: Leveraging
    Sparsification for Out-of-Distribution Detection", ECCV 2022, arXiv:2111.09805. Default
    p = 90 (the paper's CIFAR setting and OpenOOD's).

    The ID mean is streamed exactly (float64); the percentile is exact over ``V``. Scoring is one
    GEMM with the masked weights (no ``[B, C, D]`` temporary); the mask is rebuilt lazily when
    ``percentile`` changes, so no refit is needed.
    """

    name = "dice"
    paper = "Sun & Li, ECCV 2022, arXiv:2111.09805"
    formula = "logsumexp((W * 1[W * mean(h) > p-th pct]) h + b)"
    needs_fit = True
    constraints = {"percentile": Interval(0.0, 100.0, closed="left")}
    search_space = {"percentile": [10, 30, 50, 70, 90]}

    def __init__(self, percentile: float = 90.0) -> None:
        super().__init__()
        self.percentile = percentile
        self._masked = LazyCache()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=False, penultimate=True)

    _fit_state = (("_mean", "merge"),)

    def _fit_begin(self, adapter) -> None:
        self._adapter_fit = adapter
        self._mean = FeatureMean(self.name)

    def _fit_update(self, feats: Features) -> None:
        self._mean.update(feats)

    def _fit_end(self) -> None:
        self.mean_ = self._mean.mean().float()
        self.W_, self.b_ = self._adapter_fit.head_weight_bias()
        del self._mean, self._adapter_fit

    def masked_weight(self) -> torch.Tensor:
        """``W * M`` for the current ``percentile`` (cached)."""

        def build() -> torch.Tensor:
            contrib = (self.W_.double() * self.mean_.double()[None, :]).to(self.W_.device)
            s, _ = torch.sort(contrib.flatten())
            q = torch.tensor([float(self.percentile) / 100.0], dtype=torch.float64)
            thr = quantile_sorted(s, q)[0]
            return self.W_ * (contrib > thr).to(self.W_.dtype)

        return self._masked.get((self.W_, self.mean_, float(self.percentile)), build)

    def score_features(self, feats: Features) -> torch.Tensor:
        h = feats.require("penultimate").float()
        return _energy_of(h, self.masked_weight(), self.b_)
