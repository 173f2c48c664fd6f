"""Gaussian mixture scores on the penultimate features: one Gaussian per class (pytorch-ood 0.4
``GMM``) or an unsupervised tied-covariance mixture on PCA features (OpenOOD v1.5 ``gmm``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..stats import RunningMoments
from ..taps import Features
from ._zoo import RowSample, check_labels, feature_positions, sample_rows_for
from .base import Detector
from .constraints import Interval, OneOf
from .distances import _eig_desc
from .layer import LayerFeatures
from .registry import register

__all__ = ["GMM", "fit_tied_gmm", "kmeans_pp"]

_LOG_2PI = math.log(2.0 * math.pi)

#: largest per-class covariance table ``C x D x D`` (float64 values) the default variant keeps:
#: 2**28 values = 2 GiB (e.g. 100 classes of 1600-d features); beyond it the fit refuses
MAX_CLASS_COV_VALUES = 2**28
#: row-sample budget of the OpenOOD variant (float values: 2**24 = 64 MiB in float32; 8192 rows
#: of 2048-d features); the PCA itself uses exact streamed moments
GMM_SAMPLE_VALUES = 2**24
#: EM and k-means settings (scikit-learn's ``GaussianMixture`` / ``KMeans`` defaults)
EM_MAX_ITER, EM_TOL = 100, 1e-3
KMEANS_MAX_ITER = 300


# ---------------------------------------------------------------------------------------------
# fit accumulators (declared fit state; synchronised by the base, no distributed calls here)


class _PerClassMoments:
    """Per-class count, mean and scatter (Chan merges in float64), one row per rank.

    The tensors carry a leading rank axis (``[1, C, ...]`` in one process): a distributed fit
    gathers every rank's rows (``"cat"``) and :meth:`_after_sync` merges them exactly.
    """

    _fit_state = (("n", "cat"), ("mean", "cat"), ("m2", "cat"))

    def __init__(self, classes: int, dim: int, device: torch.device) -> None:
        if classes * dim * dim > MAX_CLASS_COV_VALUES:
            gib = classes * dim * dim * 8 / 2**30
            raise InputError(
                f"gmm (variant='pytorch_ood') keeps one {dim} x {dim} covariance per class: {classes} classes "
                f"need {gib:.1f} GiB (limit {MAX_CLASS_COV_VALUES * 8 / 2**30:.0f} GiB). Use variant='openood' "
                "(tied covariance on PCA features) or 'mahalanobis' (one shared covariance)."
            )
        f64 = torch.float64
        self.n = torch.zeros(1, classes, dtype=f64, device=device)
        self.mean = torch.zeros(1, classes, dim, dtype=f64, device=device)
        self.m2 = torch.zeros(1, classes, dim, dim, dtype=f64, device=device)

    def update(self, h: torch.Tensor, y: torch.Tensor) -> None:
        h = h.detach().double().to(self.mean.device)
        y = y.to(h.device)
        for c in torch.unique(y).tolist():
            xc = h[y == c]
            nb = xc.shape[0]
            mb = xc.mean(0)
            dc = xc - mb
            self._merge(c, nb, mb, dc.T @ dc)

    def _merge(self, c: int, nb: float, mb: torch.Tensor, m2b: torch.Tensor, r: int = 0) -> None:
        na = float(self.n[r, c])
        n = na + nb
        delta = mb - self.mean[r, c]
        self.mean[r, c] += delta * (nb / n)
        self.m2[r, c] += m2b + torch.outer(delta, delta) * (na * nb / n)
        self.n[r, c] = n

    def _after_sync(self) -> None:
        n, mean, m2 = self.n, self.mean, self.m2
        self.n, self.mean, self.m2 = n[:1].clone(), mean[:1].clone(), m2[:1].clone()
        for r in range(1, n.shape[0]):
            for c in range(n.shape[1]):
                if float(n[r, c]) > 0:
                    self._merge(c, float(n[r, c]), mean[r, c], m2[r, c])


class _SampleAndMoments:
    """Exact streamed moments (for the PCA) and a bounded uniform row sample (for EM)."""

    _fit_state = (("moments", "moments"), ("sample", "merge"))

    def __init__(self, dim: int, device: torch.device) -> None:
        self.moments = RunningMoments(dim, device=device)
        self.sample = RowSample(sample_rows_for(dim, GMM_SAMPLE_VALUES), salt=21)

    def update(self, h: torch.Tensor, feats: Features) -> None:
        self.moments.update(h)
        self.sample.add(h.float(), feature_positions(feats, self.sample.seen))


# ---------------------------------------------------------------------------------------------
# k-means++ and EM for a tied-covariance mixture (float64, CPU, seeded)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min(0)


def kmeans_pp(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Cluster labels ``[n]`` of ``x`` by k-means: k-means++ seeding (one candidate per step, a
    ``torch.Generator`` seeded with ``seed``), then Lloyd iterations until the labels stop
    changing (at most 300). Empty clusters keep their centre."""
    g = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=g))]]
    d2 = _sq_dist(x, centres[0][None, :])[:, 0]
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than clusters: repeat one
            idx = int(torch.randint(n, (1,), generator=g))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=g))
        centres.append(x[idx])
        d2 = torch.minimum(d2, _sq_dist(x, x[idx][None, :])[:, 0])
    c = torch.stack(centres)
    labels = _sq_dist(x, c).argmin(1)
    for _ in range(KMEANS_MAX_ITER):
        counts = torch.bincount(labels, minlength=k).double()
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        new = _sq_dist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _m_step(x: torch.Tensor, resp: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's tied M-step: weights, means, shared covariance (+ ``reg`` on the diagonal)."""
    nk = resp.sum(0) + 10 * torch.finfo(torch.float64).eps
    means = resp.T @ x / nk[:, None]
    cov = (x.T @ x - (nk[:, None] * means).T @ means) / nk.sum()
    cov = 0.5 * (cov + cov.T) + reg * torch.eye(x.shape[1], dtype=x.dtype)
    return nk / nk.sum(), means, cov


def _log_joint(x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``log w_k + log N(x | mu_k, Sigma)`` ``[n, K]``."""
    chol = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(chol, (x[:, None, :] - means[None]).reshape(-1, x.shape[1]).T, upper=False)
    d2 = (z * z).sum(0).reshape(x.shape[0], means.shape[0])
    logdet = 2.0 * chol.diagonal().log().sum()
    return weights.log()[None, :] - 0.5 * (d2 + logdet + x.shape[1] * _LOG_2PI)


def fit_tied_gmm(
    x: torch.Tensor,
    k: int,
    *,
    reg: float = 1e-6,
    seed: int = 0,
    init: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """EM for a ``k``-component Gaussian mixture with one shared covariance (float64).

    scikit-learn's ``GaussianMixture(covariance_type="tied", reg_covar=reg)`` algorithm: the
    initial parameters are the M-step of the k-means labels (:func:`kmeans_pp`) unless ``init``
    = ``(weights, means, cov)`` is given; then E- and M-steps until the mean log-likelihood
    changes by less than 1e-3 (at most 100 iterations). Returns the weights, means, covariance,
    the initial parameters, the iteration count and whether it converged.
    """
    x = x.double().cpu()
    if init is None:
        labels = kmeans_pp(x, k, seed)
        init = _m_step(x, torch.nn.functional.one_hot(labels, k).double(), reg)
    weights, means, cov = init
    lower = -math.inf
    converged, n_iter = False, 0
    for _ in range(EM_MAX_ITER):
        n_iter += 1
        lj = _log_joint(x, weights, means, cov)
        lpn = torch.logsumexp(lj, dim=1)
        resp = (lj - lpn[:, None]).exp()
        weights, means, cov = _m_step(x, resp, reg)
        prev, lower = lower, float(lpn.mean())
        if abs(lower - prev) < EM_TOL:
            converged = True
            break
    return {"weights": weights, "means": means, "cov": cov, "init": init, "n_iter": n_iter, "converged": converged}


# ---------------------------------------------------------------------------------------------
# the detector


@register
class GMM(LayerFeatures, Detector):
    """Gaussian mixture log-likelihood of the penultimate features ``h``.

    ``variant="pytorch_ood"`` (default; pytorch-ood 0.4 ``GMM``): one Gaussian per class with its
    own covariance and the class frequency as prior::

        score(h) = log sum_c pi_c N(h | mu_c, Sigma_c + reg I),   pi_c = n_c / n

    ``variant="openood"`` (OpenOOD v1.5 ``gmm`` postprocessor, its penultimate-layer term): PCA
    of the fit features to ``pca_dim`` dimensions (``u = P^T h``, no centring, as OpenOOD), an
    unsupervised ``K``-component mixture with one tied covariance fitted by EM (scikit-learn's
    ``GaussianMixture(covariance_type="tied", reg_covar=reg)`` algorithm), and::

        score(h) = log sum_k w_k exp(-(u - m_k)^T S^-1 (u - m_k) / 2)

    (OpenOOD's formula: no normalising constant; it adds 1e-40 before the log in float32, so its
    far-OOD scores saturate at -92.1; normscore evaluates the log-sum-exp exactly).

    A classical baseline (class-conditional Gaussians; Lee et al., NeurIPS 2018,
    arXiv:1807.03888, fit one shared covariance, see ``mahalanobis``); no single paper introduced
    the per-class form. Higher = more in-distribution (pytorch-ood returns the negative).

    Implementation, default variant: per-class counts, means and scatter matrices are streamed
    in float64 (Chan merges); memory ``C x D x D`` float64 (the fit refuses beyond 2 GiB and
    names the alternatives). ``reg`` (pytorch-ood's, 1e-6) is added at score time, so changing
    it needs no refit; the Cholesky factors are cached. Classes without fit samples get no
    component. Needs labels.

    OpenOOD variant: the PCA uses exact streamed moments; **EM runs on a bounded uniform sample
    of the fit rows** (:class:`~normscore.detectors._zoo.RowSample`, at most ``2**24 / D`` rows,
    e.g. 8192 of 2048-d features; exact when the fit split is smaller), in float64 on the CPU.
    EM is initialised from k-means (k-means++ seeding with a ``torch.Generator`` seeded by
    ``seed``, one candidate per step, then Lloyd iterations), so the fit is deterministic;
    scikit-learn seeds its k-means differently, so the mixture found can differ from OpenOOD's
    (from the same initial parameters the EM iterates agree, tested). OpenOOD's config runs
    ``K = 10`` clusters (the number of CIFAR-10 classes) on ``pca_10`` penultimate features;
    ``n_components=None`` means the number of classes of the model. Needs no labels. ``reg``,
    ``n_components``, ``pca_dim`` and ``seed`` act at fit time here (changing them raises
    until refit).
    """

    name = "gmm"
    paper = "Classical class-conditional Gaussians (pytorch-ood 0.4 GMM; OpenOOD v1.5 gmm)"
    formula = "log sum_c pi_c N(h | mu_c, Sigma_c + reg I)  [openood: log sum_k w_k exp(-d_k^2/2) on PCA(h)]"
    needs_labels = True
    per_class = True
    needs_fit = True
    constraints = {
        "variant": OneOf(("pytorch_ood", "openood")),
        "reg": Interval(0.0, float("inf")),
        "n_components": Interval(1, float("inf"), integer=True, allow_none=True),
        "pca_dim": Interval(1, float("inf"), integer=True),
        "seed": Interval(0, 2**62, integer=True),
    }
    search_space = {"reg": [1e-6, 1e-3, 1e-1]}

    def __init__(
        self,
        variant: str = "pytorch_ood",
        reg: float = 1e-6,
        n_components: int | None = None,
        pca_dim: int = 10,
        seed: int = 0,
        layer: str | list[str] = "penultimate",
        layer_aggregation: str = "concat",
    ) -> None:
        super().__init__()
        self.layer = layer
        self.layer_aggregation = layer_aggregation
        self.variant = variant
        self.reg = reg
        self.n_components = n_components
        self.pca_dim = pca_dim
        self.seed = seed

    # ------------------------------------------------------------------ labels follow the variant
    def fit_needs_labels(self) -> bool:
        return self.variant == "pytorch_ood"

    def _check_labels(self, feats: Features) -> None:
        if self.fit_needs_labels():
            super()._check_labels(feats)

    def capture_spec(self, adapter, stage):
        # logits at fit time only to know the number of classes
        return self.layer_spec(adapter, logits=stage == "fit")

    # ------------------------------------------------------------------ fit
    _fit_state = (("_acc", "merge"),)

    def _fit_begin(self, adapter) -> None:
        self._acc: Any = None
        self._classes = 0

    def _fit_update(self, feats: Features) -> None:
        h = self.layer_features(feats)
        c = feats.require("logits").shape[1]
        self._classes = c
        if self.variant == "pytorch_ood":
            if self._acc is None:
                self._acc = _PerClassMoments(c, h.shape[1], h.device)
            self._acc.update(h, check_labels(feats["labels"].to(h.device), c, self.name))
        else:
            if self._acc is None:
                self._acc = _SampleAndMoments(h.shape[1], h.device)
            self._acc.update(h, feats)

    def _fit_end(self) -> None:
        acc, classes = self._acc, self._classes
        del self._acc, self._classes
        if acc is None:
            raise InputError(f"{self.name} saw no fit samples.")
        self.fit_variant_ = self.variant
        if self.variant == "pytorch_ood":
            n = acc.n[0]
            present = n > 0
            nc = n[present]
            self.class_means_ = acc.mean[0][present]
            covs = acc.m2[0][present] / nc[:, None, None]
            self.class_covs_ = 0.5 * (covs + covs.transpose(1, 2))
            self.log_weights_ = (nc / nc.sum()).log()
            self.present_ = present
            return
        m = acc.moments
        if m.n == 0:
            raise InputError(f"{self.name} saw no fit samples.")
        d = m.dim
        k_dim = min(int(self.pca_dim), d)
        _, vecs = _eig_desc(m.m2 / m.n)
        proj = vecs[:, :k_dim].cpu()
        x = acc.sample.rows().double().cpu() @ proj
        k = classes if self.n_components is None else int(self.n_components)
        if x.shape[0] < k:
            raise InputError(
                f"gmm (variant='openood') needs at least n_components={k} fit samples, got {x.shape[0]}. "
                "Fit on more data or lower n_components."
            )
        try:
            res = fit_tied_gmm(x, k, reg=float(self.reg), seed=int(self.seed))
        except torch.linalg.LinAlgError as e:
            raise InputError(
                f"gmm (variant='openood'): the tied covariance is singular ({e}); raise reg (now {self.reg})."
            ) from None
        self.proj_ = proj.to(m.mean.device)
        self.gmm_weights_ = res["weights"].to(m.mean.device)
        self.gmm_means_ = res["means"].to(m.mean.device)
        self.gmm_cov_ = res["cov"].to(m.mean.device)
        self.em_iterations_ = int(res["n_iter"])
        self.em_converged_ = bool(res["converged"])
        self.n_sampled_rows_ = int(x.shape[0])
        self.fit_hparams_ = {
            "reg": float(self.reg),
            "n_components": self.n_components,
            "pca_dim": int(self.pca_dim),
            "seed": int(self.seed),
        }

    # ------------------------------------------------------------------ score
    def _check_variant(self) -> None:
        if self.variant != self.fit_variant_:
            raise ConfigError(
                f"gmm was fitted with variant={self.fit_variant_!r}, now variant={self.variant!r}; refit the detector."
            )
        if self.variant == "openood":
            now = {"reg": float(self.reg), "n_components": self.n_components, "pca_dim": int(self.pca_dim)}
            now["seed"] = int(self.seed)
            changed = [k for k, v in now.items() if self.fit_hparams_[k] != v]
            if changed:
                raise ConfigError(
                    f"gmm (variant='openood'): {changed} changed after fitting ({self.fit_hparams_}); the mixture "
                    "depends on them. Refit the detector."
                )

    def _class_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached Cholesky factors of ``Sigma_c + reg I`` ``[C', D, D]`` and their log-determinants."""

        def build():
            covs = self.class_covs_
            eye = torch.eye(covs.shape[1], dtype=covs.dtype, device=covs.device)
            chol, info = torch.linalg.cholesky_ex(covs + float(self.reg) * eye)
            if bool((info != 0).any()):
                raise InputError(
                    f"gmm: a class covariance plus reg={self.reg} is not positive definite (too few fit samples "
                    "for the feature dimension); raise reg, e.g. create('gmm', reg=1e-3)."
                )
            return chol, 2.0 * chol.diagonal(dim1=1, dim2=2).log().sum(1)

        return self._memo("chol", (self.class_covs_, float(self.reg)), build)

    def class_log_likelihoods(self, h: torch.Tensor) -> torch.Tensor:
        """``log pi_c + log N(h | mu_c, Sigma_c + reg I)`` ``[B, C']`` (default variant, float64)."""
        chol, logdet = self._class_factors()
        mu = self.class_means_
        h = h.double().to(mu.device)
        b, d = h.shape
        step = max(1, (1 << 24) // max(1, b * d))  # bound the [chunk, D, B] temporaries
        parts = []
        for s in range(0, mu.shape[0], step):
            diff = (h[None, :, :] - mu[s : s + step, None, :]).transpose(1, 2)  # [k, D, B]
            z = torch.linalg.solve_triangular(chol[s : s + step], diff, upper=False)
            parts.append((z * z).sum(1).T)  # [B, k]
        d2 = torch.cat(parts, dim=1)
        return self.log_weights_[None, :] - 0.5 * (d2 + logdet[None, :] + d * _LOG_2PI)

    def _openood_log_terms(self, h: torch.Tensor) -> torch.Tensor:
        """``log w_k - d_k^2 / 2`` ``[B, K]`` on the PCA features (OpenOOD variant)."""
        cov = self.gmm_cov_
        chol = self._memo("tied_chol", (cov,), lambda: torch.linalg.cholesky(cov))
        u = h.double().to(cov.device) @ self.proj_
        z = torch.linalg.solve_triangular(
            chol, (u[:, None, :] - self.gmm_means_[None]).reshape(-1, u.shape[1]).T, upper=False
        )
        d2 = (z * z).sum(0).reshape(u.shape[0], -1)
        return self.gmm_weights_.log()[None, :] - 0.5 * d2

    def score_features(self, feats: Features) -> torch.Tensor:
        self._check_variant()
        h = self.layer_features(feats)
        terms = self.class_log_likelihoods(h) if self.variant == "pytorch_ood" else self._openood_log_terms(h)
        return torch.logsumexp(terms, dim=1).float()
