"""Distance and feature-space scores on the pooled penultimate features ``h`` (and the head).

Mahalanobis, RMDS, KNN, ViM, SHE, NNGuide and fDBD. Statistics are streamed in float64
(:mod:`normscore.stats`); Gaussian scores whiten once (``eigh``) and score with one GEMM in
float64; neighbour searches use :class:`normscore.detectors.engines.knn.KNNBank` (faiss) or a chunked exact top-k.
Score-time hyperparameters (``shrinkage``, ``k``, ViM's ``dim``, fDBD's normaliser) are
applied from stored fitted state, so changing them needs no refit; only the bank-subsampling
``alpha`` of KNN / NNGuide is fixed at fit time (changing it raises until you refit).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..stats import ClassMoments, RunningMoments
from ..taps import CaptureSpec, Features
from ._zoo import (
    FeatureMean,
    LazyCache,
    RowSample,
    check_labels,
    feature_positions,
    hash_positions,
    normalize_rows,
    sample_rows_for,
)
from .base import Detector
from .constraints import Constraint, Interval, OneOf
from .engines.knn import KNNBank
from .layer import LayerFeatures
from .registry import register

__all__ = ["FDBD", "KNN", "SHE", "Mahalanobis", "NNGuide", "RelativeMahalanobis", "ViM"]

_EPS64 = torch.finfo(torch.float64).eps


# ---------------------------------------------------------------------------------------------
# Gaussian scores


def _whitener(eigvals: torch.Tensor, eigvecs: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``P [D, r]`` with ``P P^T`` the (pseudo-)inverse of the shrunk covariance.

    ``Sigma_l = (1 - l) Sigma + l (tr Sigma / D) I`` shares ``Sigma``'s eigenvectors; its
    eigenvalues are ``(1 - l) e + l mean(e)``. Directions with eigenvalue at most
    ``D * eps * max(e)`` are dropped: for ``l = 0`` that is the pseudo-inverse scikit-learn's
    ``EmpiricalCovariance`` uses (``pinvh``), the reference implementations' choice.
    """
    e = eigvals.clamp_min(0)
    lam = float(shrinkage)
    if lam > 0:
        e = (1.0 - lam) * e + lam * e.mean()
    emax = float(e.max()) if e.numel() else 0.0
    keep = e > e.numel() * _EPS64 * emax
    if not bool(keep.any()):
        raise InputError("the feature covariance is zero: all fit features are identical.")
    return eigvecs[:, keep] / e[keep].sqrt()[None, :]


def _eig_desc(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix (float64)."""
    cov = 0.5 * (cov + cov.T)
    e, v = torch.linalg.eigh(cov)
    return e.flip(0), v.flip(1)


def _sq_dists(z: torch.Tensor, m: torch.Tensor, m_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[B, K]`` from whitened rows ``z`` to whitened centres ``m``."""
    return ((z * z).sum(1, keepdim=True) - 2.0 * (z @ m.T) + m_sq[None, :]).clamp_min(0)


class _Gaussian(LayerFeatures, Detector):
    """Shared fit of the class-conditional Gaussian scores (shared covariance)."""

    needs_labels = True
    per_class = True
    needs_fit = True
    constraints = {"shrinkage": Interval(0.0, 1.0)}
    search_space = {"shrinkage": [0.0, 0.001, 0.01, 0.1]}

    def __init__(
        self, shrinkage: float = 0.0, layer: str | list[str] = "penultimate", layer_aggregation: str = "concat"
    ) -> None:
        super().__init__()
        self.shrinkage = shrinkage
        self.layer = layer
        self.layer_aggregation = layer_aggregation
        self._cache = LazyCache()

    def capture_spec(self, adapter, stage):
        # logits at fit time only to know the number of classes
        return self.layer_spec(adapter, logits=stage == "fit")

    _fit_state = (("_moments", "moments"),)

    def _fit_begin(self, adapter) -> None:
        self._moments: ClassMoments | None = None

    def _fit_update(self, feats: Features) -> None:
        h = self.layer_features(feats)
        c = feats.require("logits").shape[1]
        if self._moments is None:
            self._moments = ClassMoments(c, h.shape[1], device=h.device)
        y = check_labels(feats["labels"].to(h.device), c, self.name)
        self._moments.update(h, y)

    def _fit_end(self) -> None:
        m = self._moments
        if m is None or m.n == 0:
            raise InputError(f"{self.name} saw no fit samples.")
        n = m.n
        present = m.counts > 0
        self.present_ = present
        means = m.means()
        n_all, mean_all, scatter_all = m.total_moments()
        self.mean_ = mean_all
        self.class_means_ = torch.where(present[:, None], means, mean_all[None, :])
        self.cov_eigvals_, self.cov_eigvecs_ = _eig_desc(m.within_scatter() / n)
        self._fit_background(n_all, scatter_all)
        del self._moments

    def _fit_background(self, n: int, scatter: torch.Tensor) -> None:
        """Hook for RMDS's class-agnostic Gaussian."""

    def _class_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached ``(P, whitened centred class means [C', r], their squared norms)``."""

        def build():
            p = _whitener(self.cov_eigvals_, self.cov_eigvecs_, self.shrinkage)
            mu = (self.class_means_[self.present_] - self.mean_[None, :]) @ p
            return p, mu, (mu * mu).sum(1)

        return self._cache.get((self.cov_eigvecs_, self.class_means_, float(self.shrinkage)), build)

    def class_sq_distances(self, h: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances ``[B, C']`` to the means of the classes seen in the fit."""
        p, mu, mu_sq = self._class_terms()
        z = (h.double().to(p.device) - self.mean_) @ p
        return _sq_dists(z, mu, mu_sq)


@register
class Mahalanobis(_Gaussian):
    """Mahalanobis distance score: ``-min_c (h - mu_c)^T Sigma^-1 (h - mu_c)``.

    ``mu_c`` are the class means and ``Sigma`` the covariance shared by all classes (pooled
    within-class scatter / N) of the fit features, with labels from the loader. Lee, Lee, Lee &
    Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018, arXiv:1807.03888 (the penultimate-layer score, without input
    pre-processing or layer ensembles).

    Implementation: class sums and the scatter are streamed in float64 (Chan merges,
    ``all_reduce`` under ``torch.distributed``). ``Sigma`` is shrunk *relatively*:
    ``(1 - l) Sigma + l (tr Sigma / D) I`` (``l = shrinkage``; 0 is the paper's empirical
    covariance with a pseudo-inverse for rank-deficient features), then ``eigh`` gives a
    whitening ``P`` with ``P P^T = Sigma_l^+``. Scoring is ``z = (h - m) P`` and
    ``d_c^2 = |z|^2 - 2 z.M_c + |M_c|^2`` with the pre-whitened means ``M``: one ``[B, D] x
    [D, C]`` GEMM in float64 instead of a per-class loop. Classes absent from the fit are left
    out of the minimum.
    """

    name = "mahalanobis"
    paper = "Lee et al., NeurIPS 2018, arXiv:1807.03888"
    formula = "-min_c (h - mu_c)^T Sigma^-1 (h - mu_c), Sigma shared (relative shrinkage)"

    def score_features(self, feats: Features) -> torch.Tensor:
        d2 = self.class_sq_distances(self.layer_features(feats))
        return (-d2.amin(dim=1)).float()


@register
class RelativeMahalanobis(_Gaussian):
    """Relative Mahalanobis distance: ``-min_c (MD_c(h) - MD_0(h))``.

    ``MD_c`` is the squared Mahalanobis distance to class ``c`` with the shared within-class
    covariance (as :class:`Mahalanobis`), ``MD_0`` the squared distance to one class-agnostic
    Gaussian fitted to all fit features (mean and total covariance). Ren, Fort, Liu, Roy, Padhy
    & Lakshminarayanan, "A Simple Fix to Mahalanobis Distance for Improving Near-OOD
    Detection", ICML 2021 UDL workshop, arXiv:2106.09022. Both covariances use the same
    relative shrinkage and whitening GEMMs (see :class:`Mahalanobis`).
    """

    name = "rmds"
    paper = "Ren et al., ICML 2021 UDL workshop, arXiv:2106.09022"
    formula = "-min_c [(h-mu_c)^T Sigma^-1 (h-mu_c) - (h-mu_0)^T Sigma_0^-1 (h-mu_0)]"

    def __init__(
        self, shrinkage: float = 0.0, layer: str | list[str] = "penultimate", layer_aggregation: str = "concat"
    ) -> None:
        super().__init__(shrinkage=shrinkage, layer=layer, layer_aggregation=layer_aggregation)
        self._bg_cache = LazyCache()

    def _fit_background(self, n: int, scatter: torch.Tensor) -> None:
        self.bg_eigvals_, self.bg_eigvecs_ = _eig_desc(scatter / n)

    def background_sq_distances(self, h: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance ``[B]`` to the class-agnostic Gaussian."""
        p = self._bg_cache.get(
            (self.bg_eigvecs_, float(self.shrinkage)),
            lambda: _whitener(self.bg_eigvals_, self.bg_eigvecs_, self.shrinkage),
        )
        z = (h.double().to(p.device) - self.mean_) @ p
        return (z * z).sum(1)

    def score_features(self, feats: Features) -> torch.Tensor:
        h = self.layer_features(feats)
        d2 = self.class_sq_distances(h)
        return (self.background_sq_distances(h) - d2.amin(dim=1)).float()


# ---------------------------------------------------------------------------------------------
# neighbours


class _Bank(LayerFeatures, Detector):
    """Shared fit of the neighbour detectors: a bank of (a subsample of) fit rows."""

    needs_fit = True
    _salt = 0

    def _bank_rows(self, feats: Features) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    _fit_state = (("_seen", "sum"), ("_parts", "cat"), ("_pos", "cat"))
    _fit_order = "_pos"

    def _fit_begin(self, adapter) -> None:
        self._parts: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self._seen = 0

    def _fit_update(self, feats: Features) -> None:
        rows = self._bank_rows(feats)
        pos = feature_positions(feats, self._seen).to(rows.device)
        if float(self.alpha) < 1.0:
            keep = hash_positions(pos, self._salt).to(rows.device) < float(self.alpha)
            rows, pos = rows[keep], pos[keep]
        self._parts.append(rows.to(getattr(torch, getattr(self, "bank_dtype", "float32"))))
        self._pos.append(pos)
        self._seen += feats.batch_size

    def _fit_end(self) -> None:
        bank = torch.cat(self._parts) if self._parts else torch.zeros(0, 0)
        seen = self._seen  # all ranks: every rank's rows come in global position order (``_fit_order``)
        del self._parts, self._pos, self._seen
        if bank.shape[0] < int(self.k):
            raise InputError(
                f"{self.name}: the bank holds {bank.shape[0]} vectors (alpha={self.alpha} of {seen} fit "
                f"samples) but k={self.k} neighbours are needed. Lower k (create({self.name!r}, k=...)), "
                "raise alpha, or fit on more data."
            )
        self.bank_ = bank.to(getattr(torch, getattr(self, "bank_dtype", "float32")))
        self.fit_alpha_ = float(self.alpha)

    def _check_bank(self) -> None:
        if float(self.alpha) != self.fit_alpha_:
            raise ConfigError(
                f"{self.name}: alpha was changed to {self.alpha} after fitting with alpha={self.fit_alpha_}; "
                "the bank depends on it. Refit the detector."
            )
        if int(self.k) > self.bank_.shape[0]:
            raise ConfigError(
                f"{self.name}: k={self.k} exceeds the bank size {self.bank_.shape[0]}; lower k or refit on more data."
            )


@register
class KNN(_Bank):
    """Deep nearest neighbours: ``-|z - z_(k)|`` with ``z = h / |h|`` and ``z_(k)`` the ``k``-th
    nearest normalised fit feature.

    Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022,
    arXiv:2204.06507. Default k = 50 (the paper's CIFAR-10 setting and OpenOOD's); ``alpha``
    subsamples the bank (the paper uses 1% on ImageNet) by a hash of each row's position, so
    the bank does not depend on the batch size.

    Search: :class:`normscore.detectors.engines.knn.KNNBank` - faiss ``IndexFlatL2`` (exact, default) or
    ``IndexIVFFlat`` (``index="ivf"``, approximate, for banks over ~1M vectors) on CPU, chunked
    ``matmul`` + ``topk`` on GPU. The k-th distance is then recomputed exactly from the vectors,
    so scores do not depend on the batch size. The index is rebuilt lazily from ``bank_``
    (e.g. after loading).
    """

    name = "knn"
    paper = "Sun, Ming, Zhu & Li, ICML 2022, arXiv:2204.06507"
    formula = "-|z - z_(k)|, z = h/|h|, z_(k) = k-th nearest normalised ID feature"
    constraints = {
        "k": Interval(1, float("inf"), integer=True),
        "index": OneOf(("flat", "ivf")),
        "alpha": Interval(0.0, 1.0, closed="right"),
        "bank_dtype": OneOf(("float32", "float16")),
    }
    search_space = {"k": [1, 10, 20, 50, 100, 200, 500, 1000]}
    _salt = 2

    def __init__(
        self,
        k: int = 50,
        index: str = "flat",
        alpha: float = 1.0,
        bank_dtype: str = "float32",
        layer: str | list[str] = "penultimate",
        layer_aggregation: str = "concat",
    ) -> None:
        super().__init__()
        self.k = k
        self.index = index
        self.alpha = alpha
        self.bank_dtype = bank_dtype
        self.layer = layer
        self.layer_aggregation = layer_aggregation
        self._index_cache = LazyCache()

    def capture_spec(self, adapter, stage):
        return self.layer_spec(adapter, logits=False)

    def _bank_rows(self, feats: Features) -> torch.Tensor:
        return normalize_rows(self.layer_features(feats))

    def _knn_bank(self) -> KNNBank:
        def build() -> KNNBank:
            kb = KNNBank(normalize=True, index=self.index, storage_dtype=self.bank_.dtype)
            kb.set_bank(self.bank_)
            return kb

        return self._index_cache.get((self.bank_, self.index), build)

    def score_features(self, feats: Features) -> torch.Tensor:
        self._check_bank()
        k = int(self.k)
        q = normalize_rows(self.layer_features(feats))
        d, idx = self._knn_bank().search(q, k)
        kth = idx[:, k - 1].to(q.device)
        ok = kth >= 0  # an IVF search may find fewer than k vectors
        exact = (q - self.bank_[kth.clamp_min(0)].to(q.device).float()).norm(dim=1)
        dist = torch.where(ok, exact, d[:, k - 1].to(q.device).float())
        return -dist


def _topk_mean_ip(q: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 65536) -> torch.Tensor:
    """Mean of the ``k`` largest inner products of each query with the bank (exact, chunked)."""
    best: torch.Tensor | None = None
    for s in range(0, bank.shape[0], chunk):
        sims = q @ bank[s : s + chunk].to(q.device).float().T
        cand = sims if best is None else torch.cat([best, sims], dim=1)
        best = torch.topk(cand, min(k, cand.shape[1]), dim=1).values
    assert best is not None
    return best.mean(dim=1)


@register
class NNGuide(_Bank):
    """Nearest-neighbour guidance: ``E(x) * mean_topk_i (z . g_i)``.

    ``E = logsumexp(logits)`` is the energy, ``z = h / |h|``, and the guidance bank holds
    ``g_i = z_i * E(x_i)`` for (an ``alpha``-subsample of) the fit samples. Park, Jung & Teoh,
    "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023, arXiv:2309.14888.
    Defaults k = 100, alpha = 0.01 (the paper's ImageNet setting and OpenOOD's).

    The top-k inner products are an exact chunked ``matmul`` + running ``topk`` (the bank is
    built once at fit time, never per batch).
    """

    name = "nnguide"
    paper = "Park, Jung & Teoh, ICCV 2023, arXiv:2309.14888"
    formula = "logsumexp(z) * mean top-k_i <h/|h|, g_i>, g_i = h_i/|h_i| * logsumexp(z_i)"
    constraints = {"k": Interval(1, float("inf"), integer=True), "alpha": Interval(0.0, 1.0, closed="right")}
    search_space = {"k": [1, 10, 50, 100, 200, 500]}
    _salt = 3

    def __init__(
        self,
        k: int = 100,
        alpha: float = 0.01,
        layer: str | list[str] = "penultimate",
        layer_aggregation: str = "concat",
    ) -> None:
        super().__init__()
        self.k = k
        self.alpha = alpha
        self.layer = layer
        self.layer_aggregation = layer_aggregation

    def capture_spec(self, adapter, stage):
        return self.layer_spec(adapter, logits=True)

    def _bank_rows(self, feats: Features) -> torch.Tensor:
        conf = torch.logsumexp(feats.require("logits").float(), dim=1)
        return normalize_rows(self.layer_features(feats)) * conf[:, None]

    def score_features(self, feats: Features) -> torch.Tensor:
        self._check_bank()
        q = normalize_rows(self.layer_features(feats))
        guide = _topk_mean_ip(q, self.bank_, int(self.k))
        return guide * torch.logsumexp(feats.require("logits").float(), dim=1)


# ---------------------------------------------------------------------------------------------
# ViM


class _DimConstraint(Constraint):
    """``None`` (the paper's rule), an integer >= 1, or a fraction of D in (0, 1)."""

    def check(self, name: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"hyperparameter {name}={value!r} must be None, an integer >= 1 or a fraction in (0, 1).")
        if 0 < value < 1:
            return
        if value >= 1 and float(value).is_integer():
            return
        raise ConfigError(
            f"hyperparameter {name}={value!r} is out of range; use None, an integer >= 1 (dimensions) "
            "or a fraction in (0, 1) of the feature dimension."
        )


@register
class ViM(LayerFeatures, Detector):
    """Virtual-logit matching: ``logsumexp(z) - alpha |(h - o) P_perp|``.

    ``o = -pinv(W) b`` is the origin of the head's logit space; ``P_perp`` spans the
    eigenvectors of ``E[(h - o)(h - o)^T]`` beyond the ``dim`` principal ones; ``alpha =
    mean(max_c z_c) / mean |(h - o) P_perp|`` over the fit data. Wang, Li, Feng & Zhang, "ViM:
    Out-Of-Distribution with Virtual-logit Matching", CVPR 2022, arXiv:2203.10807.

    ``dim``: ``None`` applies the paper's choices (1000 for D >= 2048, 512 for D >= 768) and D/2
    for smaller features; an integer is a number of dimensions, a float in (0, 1) a fraction of
    D (the search space uses fractions so it fits any model).

    Implementation: the second moment about ``o`` is streamed in float64 and diagonalised once
    with ``eigh``; all eigenvectors are kept, and the mean residual norm is tabulated for every
    ``dim`` at fit time, so changing ``dim`` is a slice and a table lookup (no refit; the
    OpenOOD bug fixed by its PR#298 cannot happen). The max-logit mean is exact; the mean
    residual norm is computed on a uniform sample of at most ``2**22 / D`` fit rows (exact when
    the fit split is smaller).
    """

    name = "vim"
    paper = "Wang, Li, Feng & Zhang, CVPR 2022, arXiv:2203.10807"
    formula = "logsumexp(z) - alpha*|(h - o) P_perp|, o = -pinv(W) b, alpha = mean max z / mean residual"
    needs_fit = True
    constraints = {"dim": _DimConstraint()}
    search_space = {"dim": [0.25, 0.5, 0.75, 0.9]}

    layer_needs_head = (
        "ViM's virtual logit is defined on the head's input only: its origin o = -pinv(W) b and its scale "
        "(matched to the logits W h + b) come from the linear head on the same features, and neither the paper "
        "nor the official code defines them at another block."
    )

    def __init__(self, dim: int | float | None = None, layer: str = "penultimate") -> None:
        super().__init__()
        self.dim = dim
        self.layer = layer

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True, penultimate=True)

    def principal_dim(self, d: int) -> int:
        """The principal-subspace dimension for features of dimension ``d``."""
        v = self.dim
        if v is None:
            return 1000 if d >= 2048 else 512 if d >= 768 else max(1, d // 2)
        if 0 < v < 1:
            return min(max(1, round(v * d)), d - 1)
        if int(v) >= d:
            raise ConfigError(f"vim: dim={v} must be smaller than the feature dimension {d}.")
        return int(v)

    _fit_state = (("_moments", "moments"), ("_sample", "merge"), ("_maxlogit", "sum"))

    def _fit_begin(self, adapter) -> None:
        self._adapter_fit = adapter
        self._moments: RunningMoments | None = None
        self._sample: RowSample | None = None
        self._maxlogit = 0.0

    def _fit_update(self, feats: Features) -> None:
        h = feats.require("penultimate")
        if self._moments is None:
            self._moments = RunningMoments(h.shape[1], device=h.device)
            self._sample = RowSample(sample_rows_for(h.shape[1]), salt=4)
        self._moments.update(h)
        assert self._sample is not None
        self._sample.add(h.float(), feature_positions(feats, self._sample.seen))
        self._maxlogit += float(feats.require("logits").double().amax(dim=1).sum())

    def _fit_end(self) -> None:
        m, sample = self._moments, self._sample
        if m is None or sample is None or m.n == 0:
            raise InputError("vim saw no fit samples.")
        w, b = self._adapter_fit.head_weight_bias()
        dev = m.mean.device
        u = -(torch.linalg.pinv(w.double()) @ b.double()).to(dev)
        dm = m.mean - u
        second = m.m2 / m.n + torch.outer(dm, dm)
        _, vecs = _eig_desc(second)
        y = (sample.rows().double().to(dev) - u) @ vecs  # coordinates in the eigenbasis
        tail = y.pow(2).flip(1).cumsum(1).flip(1)  # tail[:, j] = sum_{i >= j} y_i^2
        resid = torch.cat([tail, torch.zeros(tail.shape[0], 1, dtype=tail.dtype, device=dev)], 1).sqrt()
        self.origin_ = u
        self.eigvecs_ = vecs
        self.resid_mean_ = resid.mean(0)  # [D + 1]: mean residual norm for each dim
        self.maxlogit_mean_ = self._maxlogit / m.n
        self.n_sampled_rows_ = int(y.shape[0])
        del self._moments, self._sample, self._maxlogit, self._adapter_fit

    @property
    def alpha(self) -> float:
        """``alpha`` for the current ``dim``."""
        d = self.principal_dim(self.eigvecs_.shape[0])
        r = self.resid_mean_
        return self._memo("alpha", (r, d), lambda: float(self.maxlogit_mean_ / r[d]))

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """``|(h - o) P_perp|`` in float64, ``[B]``."""
        d = self.principal_dim(self.eigvecs_.shape[0])
        vecs = self.eigvecs_
        # a contiguous copy, made once: the column slice is strided, and a strided GEMM operand
        # costs a full copy of the D x (D - d) matrix on every call
        ns = self._memo("null_space", (vecs, d), lambda: vecs[:, d:].contiguous())
        return ((h.double().to(ns.device) - self.origin_) @ ns).norm(dim=1)

    def score_features(self, feats: Features) -> torch.Tensor:
        e = torch.logsumexp(feats.require("logits").double(), dim=1)
        r = self.residual(feats.require("penultimate")).to(e.device)
        return (e - self.alpha * r).float()


# ---------------------------------------------------------------------------------------------
# SHE and fDBD


@register
class SHE(LayerFeatures, Detector):
    """Simplified Hopfield energy: ``h . m_{argmax z}``.

    ``m_c`` is the mean penultimate feature of the fit samples of class ``c`` that the model
    classifies correctly (labels from the loader). Zhang, Fu, Peng, Zhang, Liang & Zhao,
    "Out-of-Distribution Detection based on In-Distribution Data Patterns Memorization with
    Modern Hopfield Energy", ICLR 2023 (OpenReview KkazG4lgKL, no arXiv). A class without any
    correctly classified fit sample has a zero pattern (its samples score 0). Means are
    streamed in float64.
    """

    name = "she"
    paper = "Zhang et al., ICLR 2023 (OpenReview KkazG4lgKL, no arXiv)"
    formula = "<h, m_argmax z>, m_c = mean h of correctly classified fit samples of class c"
    needs_labels = True
    per_class = True
    needs_fit = True

    def __init__(self, layer: str | list[str] = "penultimate", layer_aggregation: str = "concat") -> None:
        super().__init__()
        self.layer = layer
        self.layer_aggregation = layer_aggregation

    def capture_spec(self, adapter, stage):
        return self.layer_spec(adapter, logits=True)

    _fit_state = (("_sums", "sum"), ("_counts", "sum"))

    def _fit_begin(self, adapter) -> None:
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def _fit_update(self, feats: Features) -> None:
        z = feats.require("logits")
        h = self.layer_features(feats).double()
        c = z.shape[1]
        y = check_labels(feats["labels"].to(h.device), c, self.name)
        if self._sums is None:
            self._sums = torch.zeros(c, h.shape[1], dtype=torch.float64, device=h.device)
            self._counts = torch.zeros(c, dtype=torch.float64, device=h.device)
        ok = z.argmax(1).to(h.device) == y
        self._sums.index_add_(0, y[ok], h[ok])
        self._counts.index_add_(0, y[ok], torch.ones(int(ok.sum()), dtype=torch.float64, device=h.device))

    def _fit_end(self) -> None:
        if self._sums is None:
            raise InputError("she saw no fit samples.")
        self.patterns_ = (self._sums / self._counts.clamp_min(1)[:, None]).float()
        self.class_counts_ = self._counts.long()
        del self._sums, self._counts

    def score_features(self, feats: Features) -> torch.Tensor:
        h = self.layer_features(feats).float()
        pred = feats.require("logits").argmax(1).to(h.device)
        return (h * self.patterns_[pred].to(h.device)).sum(dim=1)


@register
class FDBD(LayerFeatures, Detector):
    """Fast decision-boundary distance: mean distance of ``h`` to the decision boundaries of the
    predicted class, normalised by the distance to the mean fit feature.

    ``(1/(C-1)) sum_{c != y} |z_y - z_c| / |w_y - w_c|`` divided by ``|h - mu|`` (or by ``|h|``
    when ``distance_as_normalizer=False``), ``y = argmax z``. Liu & Qin, "Fast Decision Boundary
    based Out-of-Distribution Detector", ICML 2024, arXiv:2312.11536. The mean is streamed in
    float64; ``|w_y - w_c|`` comes from one ``[B, D] x [D, C]`` GEMM per batch (float64), never a
    ``C x C`` table, so it scales to many classes.
    """

    name = "fdbd"
    paper = "Liu & Qin, ICML 2024, arXiv:2312.11536"
    formula = "mean_{c != y} |z_y - z_c| / |w_y - w_c| / |h - mu_train|, y = argmax z"
    needs_fit = True
    constraints = {"distance_as_normalizer": OneOf((True, False))}
    search_space = {"distance_as_normalizer": [True, False]}

    layer_needs_head = (
        "fDBD measures distances to the decision boundaries of the linear head (|z_y - z_c| / |w_y - w_c|), "
        "which exist only in the head's input space."
    )

    def __init__(self, distance_as_normalizer: bool = True, layer: str = "penultimate") -> None:
        super().__init__()
        self.distance_as_normalizer = distance_as_normalizer
        self.layer = layer

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True, penultimate=True)

    _fit_state = (("_mean", "merge"),)

    def _fit_begin(self, adapter) -> None:
        self._adapter_fit = adapter
        self._mean = FeatureMean(self.name)

    def _fit_update(self, feats: Features) -> None:
        self._mean.update(feats)

    def _fit_end(self) -> None:
        self.mean_ = self._mean.mean()
        self.W_, self.b_ = self._adapter_fit.head_weight_bias()
        del self._mean, self._adapter_fit

    def score_features(self, feats: Features) -> torch.Tensor:
        z = feats.require("logits").double()
        h = feats.require("penultimate").double()
        y = z.argmax(1)
        if self.W_.shape[0] <= 4096:  # ||w_y - w_c||^2 from the head's Gram matrix (float64, once)
            gram = self._memo("gram", (self.W_,), lambda: self.W_.double() @ self.W_.double().T).to(z.device)
            sq = gram.diagonal()
            den2 = (sq[y][:, None] + sq[None, :] - 2.0 * gram[y]).clamp_min(0)
        else:  # a C x C Gram matrix would be too large: per batch
            w = self._memo("w64", (self.W_,), lambda: self.W_.double()).to(z.device)
            sq = (w * w).sum(1)
            den2 = (sq[y][:, None] + sq[None, :] - 2.0 * (w[y] @ w.T)).clamp_min(0)
        gap = (z.gather(1, y[:, None]) - z).abs()
        other = torch.arange(gap.shape[1], device=gap.device)[None, :] != y[:, None]
        ratio = torch.where(other, gap / den2.sqrt().clamp_min(1e-12), torch.zeros_like(gap))
        mean_ratio = ratio.sum(1) / max(1, z.shape[1] - 1)
        ref = h - self.mean_.to(h.device) if self.distance_as_normalizer else h
        return (mean_ratio / ref.norm(dim=1).clamp_min(1e-12)).float()
