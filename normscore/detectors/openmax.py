"""OpenMax: Weibull models of the distances of the logits to the class mean activation vectors."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, InputError
from ..taps import CaptureSpec, Features
from ._zoo import check_labels, feature_positions, hash_positions
from .base import Detector
from .constraints import Interval, OneOf
from .registry import register

__all__ = ["OpenMax", "weibull_cdf", "weibull_fit_high"]

#: libMR's translation of the tail before the fit (kept, as both peers do)
TRANSLATION = 10000.0
#: budget of the per-class logit samples (values, i.e. rows x classes, over all classes)
OPENMAX_VALUES = 2**24

_VARIANTS = {"pytorch_ood": (25, 10, False), "openood": (20, 3, True)}  # tail, alpha, correct only


def weibull_fit_high(tail: torch.Tensor) -> tuple[float, float, float]:
    """libMR's ``fit_high`` on the tail values ``[n]``: ``(shape k, scale lam, small)``.

    The values are translated by ``10000 - min(tail)`` and a two-parameter Weibull (location 0)
    is fitted by maximum likelihood: the shape ``k`` solves ``1/k + mean(log x) = sum x^k log x /
    sum x^k`` (bisection on ``log k``, then Newton, in float64 with the sums as softmax weights of
    ``k log x`` so nothing overflows) and ``lam = mean(x^k)^(1/k)``. A tail whose translated values
    are all equal gets ``k = 1e12`` (a step at that value).
    """
    t = tail.double().flatten()
    small = float(t.min())
    x = t + (TRANSLATION - small)
    lx = torch.log(x)
    mean_l = float(lx.mean())
    if float(lx.max() - lx.min()) <= 1e-15:
        k = 1e12
    else:

        def f(k: float) -> tuple[float, float]:
            w = torch.softmax(k * lx, dim=0)
            el = float((w * lx).sum())
            var = float((w * (lx - el) ** 2).sum())
            return 1.0 / k + mean_l - el, -1.0 / k**2 - var

        lo, hi = -10.0, 40.0  # log k
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if f(math.exp(mid))[0] > 0:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-13:
                break
        k = math.exp(0.5 * (lo + hi))
        for _ in range(5):  # Newton polish
            v, d = f(k)
            if d == 0:
                break
            k2 = k - v / d
            if not (k2 > 0 and math.isfinite(k2)):
                break
            k = k2
    log_lam = (torch.logsumexp(k * lx, dim=0) - math.log(x.numel())) / k
    return k, float(torch.exp(log_lam)), small


def weibull_cdf(d: torch.Tensor, k: torch.Tensor, lam: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """libMR's ``w_score``: ``1 - exp(-((d + 10000 - small) / lam)^k)`` (float64, elementwise)."""
    x = (d.double() + (TRANSLATION - small)).clamp_min(1e-300)
    return -torch.expm1(-torch.exp(k * (torch.log(x) - torch.log(lam))))


@register
class OpenMax(Detector):
    """OpenMax: ``-P(unknown)`` of the OpenMax-recalibrated softmax.

    Per class ``c`` the mean activation vector ``mu_c`` (mean logits of the fit samples of class
    ``c``) and a Weibull model ``W_c`` of the ``tailsize`` largest Euclidean distances
    ``|z - mu_c|`` of those samples (libMR ``fit_high``). At test time the ``alpha`` top classes
    ``s_1..s_alpha`` of the logits ``z`` get ``w_i = W_{s_i}.cdf(|z - mu_{s_i}|) (alpha + 1 - i) /
    alpha``; ``z'_c = z_c (1 - w_c)``, ``z'_0 = sum_c z_c w_c`` and the score is
    ``-softmax(z'_0, z'_1, ..., z'_C)_0``. Bendale & Boult, "Towards Open Set Deep Networks",
    CVPR 2016, arXiv:1511.06233.

    ``variant="pytorch_ood"`` (default): pytorch-ood 0.4 ``OpenMax`` - all fit samples of a class
    give its mean and tail, ``tailsize = 25``, ``alpha = 10``. ``variant="openood"``: OpenOOD's
    ``openmax_postprocessor.py`` - only the correctly classified fit samples, ``tailsize = 20``,
    ``alpha = 3`` (``weibull_alpha``; its ``eu_weight`` is unused because it fits and scores with
    the ``euclidean`` distance). ``tailsize=None`` / ``alpha=None`` take the variant's values.
    OpenOOD's postprocessor returns the whole ``C + 1`` OpenMax probability vector as its
    "confidence"; the scalar here is the unknown-class probability for both variants (the score
    pytorch-ood returns, negated so that higher = more ID).

    Implementation: libMR is replaced by :func:`weibull_fit_high` (an exact float64 maximum
    likelihood fit of the translated tail; pytorch-ood replaces libMR by ``scipy.stats.exponweib.fit``
    with a Nelder-Mead optimiser). The class means are streamed exactly in float64. The tail needs
    the distances to the final means, so the logits of the fit samples of each class are kept in
    a per-class uniform sample (hash of the sample position, independent of batching) of
    ``m = max(4 tailsize, 2**24 / C^2)`` rows: the fit is **exact when no class has more than m
    fit samples** (m = 167772 for 10 classes, 1677 for 100) and otherwise fits the tail on the
    sampled rows (ImageNet-1K: 100 of ~1280 per class, memory ``C m C`` floats = 64 MB).
    Classes without fit samples get ``w = 1`` (pytorch-ood's behaviour). ``alpha`` is applied at
    score time. Unlike pytorch-ood, a sample's score does not depend on the rest of its batch
    (pytorch-ood computes distances only for classes that are some batch sample's argmax and uses
    distance 0 for the other top-``alpha`` classes).
    """

    name = "openmax"
    paper = "Bendale & Boult, CVPR 2016, arXiv:1511.06233"
    formula = "-softmax([sum_c z_c w_c, z_1(1-w_1), ..., z_C(1-w_C)])_0, w_c = Weibull_c(|z-mu_c|) * rank weight"
    needs_labels = True
    per_class = True
    needs_fit = True
    constraints = {
        "variant": OneOf(tuple(_VARIANTS)),
        "tailsize": Interval(1, float("inf"), integer=True, allow_none=True),
        "alpha": Interval(1, float("inf"), integer=True, allow_none=True),
    }
    # small alphas: the search also has to change the scores of models with 5 classes
    search_space = {"alpha": [1, 2, 3, 4]}
    _salt = 11

    def __init__(self, variant: str = "pytorch_ood", tailsize: int | None = None, alpha: int | None = None) -> None:
        super().__init__()
        self.variant = variant
        self.tailsize = tailsize
        self.alpha = alpha

    @property
    def tail(self) -> int:
        return int(self.tailsize if self.tailsize is not None else _VARIANTS[self.variant][0])

    @property
    def ranks(self) -> int:
        return int(self.alpha if self.alpha is not None else _VARIANTS[self.variant][1])

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    # ------------------------------------------------------------------ fit
    _fit_state = (("_sums", "sum"), ("_counts", "sum"), ("_sample", "merge"))

    def _fit_begin(self, adapter) -> None:
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._sample: _ClassSample | None = None
        self._seen = 0

    def _fit_update(self, feats: Features) -> None:
        z = feats.require("logits").double()
        c = z.shape[1]
        y = check_labels(feats["labels"].to(z.device), c, self.name)
        pos = feature_positions(feats, self._seen).to(z.device)
        self._seen += z.shape[0]
        if self._sums is None:
            self._sums = torch.zeros(c, c, dtype=torch.float64, device=z.device)
            self._counts = torch.zeros(c, dtype=torch.float64, device=z.device)
            per_class = max(4 * self.tail, OPENMAX_VALUES // (c * c))
            self._sample = _ClassSample(per_class, self._salt)
        if _VARIANTS[self.variant][2]:
            ok = z.argmax(1) == y
            z, y, pos = z[ok], y[ok], pos[ok]
        assert self._counts is not None and self._sample is not None
        self._sums.index_add_(0, y, z)
        self._counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self._sample.add(z.float(), y, pos)

    def _fit_end(self) -> None:
        if self._sums is None or self._sample is None:
            raise InputError("openmax saw no fit samples.")
        counts = self._counts
        present = counts > 0
        if not bool(present.any()):
            raise InputError(
                "openmax (variant='openood') found no correctly classified fit sample; it fits on the "
                "samples the model classifies correctly. Use variant='pytorch_ood' or fit on more data."
            )
        c = counts.shape[0]
        means = self._sums / counts.clamp_min(1)[:, None]
        rows, labels = self._sample.rows()
        shape = torch.ones(c, dtype=torch.float64)
        scale = torch.ones(c, dtype=torch.float64)
        small = torch.zeros(c, dtype=torch.float64)
        tail = self.tail
        for k in present.nonzero().flatten().tolist():
            zk = rows[labels == k].double().to(means.device)
            d = (zk - means[k]).norm(dim=1)
            t = torch.topk(d, min(tail, d.numel())).values
            shape[k], scale[k], small[k] = weibull_fit_high(t.cpu())
        self.means_ = means
        self.present_ = present
        self.weibull_ = torch.stack([shape, scale, small], 1).to(means.device)
        self.fit_tailsize_ = tail
        self.fit_variant_ = self.variant
        del self._sums, self._counts, self._sample, self._seen

    # ------------------------------------------------------------------ score
    def _check_refit(self) -> None:
        if self.tail != self.fit_tailsize_ or self.variant != self.fit_variant_:
            raise ConfigError(
                f"openmax: variant/tailsize were changed after fitting (fitted with variant="
                f"{self.fit_variant_!r}, tailsize={self.fit_tailsize_}); the Weibull models depend on them. "
                "Refit the detector."
            )

    def w_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Weibull CDF ``[B, C]`` of the distance of ``z`` to every class mean (1 for absent classes)."""
        mu = self.means_.to(z.device)
        z = z.double()
        # float64 expansion |z|^2 - 2 z.mu + |mu|^2: one GEMM, no B x C x C tensor
        d2 = (z * z).sum(1, keepdim=True) - 2.0 * (z @ mu.T) + (mu * mu).sum(1)[None, :]
        d = d2.clamp_min(0).sqrt()
        wb = self.weibull_.to(z.device)
        w = weibull_cdf(d, wb[:, 0][None, :], wb[:, 1][None, :], wb[:, 2][None, :])
        return torch.where(self.present_.to(z.device)[None, :], w, torch.ones_like(w))

    def unknown_probability(self, z: torch.Tensor) -> torch.Tensor:
        """``P(unknown)`` of the OpenMax softmax, float64 ``[B]``."""
        self._check_refit()
        z = z.double()
        b, c = z.shape
        a = min(self.ranks, c)
        top = torch.topk(z, a, dim=1).indices
        weights = (a + 1 - torch.arange(1, a + 1, dtype=torch.float64, device=z.device)) / a
        omega = torch.zeros_like(z).scatter_(1, top, weights.expand(b, a))
        w = self.w_scores(z) * omega
        revised = torch.cat([(z * w).sum(1, keepdim=True), z * (1.0 - w)], dim=1)
        return torch.softmax(revised, dim=1)[:, 0]

    def score_features(self, feats: Features) -> torch.Tensor:
        return (-self.unknown_probability(feats.require("logits"))).float()


class _ClassSample:
    """Per-class uniform samples of at most ``per_class`` rows (bottom-k by a position hash).

    Rows are appended and pruned (per class, the ``per_class`` smallest priorities) whenever the
    buffer holds twice the budget, so each row is copied O(1) times on average; the result depends
    only on the rows, their labels and positions, not on the batching. A ``"merge"`` fit state:
    every rank's rows are gathered and pruned again.
    """

    _fit_state = (("_rows", "cat"), ("_labels", "cat"), ("_prio", "cat"), ("_pos", "cat"))

    def __init__(self, per_class: int, salt: int) -> None:
        self.per_class = int(per_class)
        self.salt = salt
        self._rows: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._prio: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._limit: int | None = None

    def add(self, z: torch.Tensor, y: torch.Tensor, pos: torch.Tensor) -> None:
        prio = hash_positions(pos, self.salt).to(z.device)
        if self._rows is None:
            self._rows, self._labels, self._prio, self._pos = z.clone(), y.clone(), prio, pos.clone()
            self._limit = 2 * self.per_class * z.shape[1]
        else:
            assert self._labels is not None and self._prio is not None and self._pos is not None
            self._rows = torch.cat([self._rows, z])
            self._labels = torch.cat([self._labels, y])
            self._prio = torch.cat([self._prio, prio])
            self._pos = torch.cat([self._pos, pos])
        assert self._limit is not None
        if self._rows.shape[0] > self._limit:
            self._prune()

    def _prune(self) -> None:
        assert self._rows is not None and self._labels is not None and self._prio is not None and self._pos is not None
        key = self._labels.double() + self._prio.double()  # class, then priority (priorities in [0, 1))
        order = torch.argsort(key)
        lab = self._labels[order]
        _, counts = torch.unique_consecutive(lab, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(lab.numel(), device=lab.device) - torch.repeat_interleave(starts, counts)
        keep = order[rank < self.per_class]
        self._rows, self._labels = self._rows[keep], self._labels[keep]
        self._prio, self._pos = self._prio[keep], self._pos[keep]

    def _after_sync(self) -> None:
        self._prune()

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept rows (stream order) and their labels."""
        if self._rows is None:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        self._prune()
        assert self._pos is not None and self._labels is not None
        order = torch.argsort(self._pos)
        return self._rows[order], self._labels[order]
