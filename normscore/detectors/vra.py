"""VRA: two-sided clipping of the penultimate activations at ID percentiles, then energy."""

from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..taps import CaptureSpec, Features
from ._zoo import RowSample, feature_positions, percentile_from_table, quantile_table, sample_rows_for
from .base import Detector
from .constraints import Interval, OneOf
from .registry import register
from .shaping import _energy_of, _head

__all__ = ["VRA"]

#: the variants' default (lower, upper) percentiles
_DEFAULTS = {"pytorch_ood": (1.0, 99.0), "openood": (10.0, 90.0)}


def _column_quantiles(s: torch.Tensor, q: float) -> torch.Tensor:
    """numpy-``linear`` ``q``-quantile (``q`` in [0, 1]) of every column of column-sorted ``s``."""
    s = s.double()
    n = s.shape[0]
    pos = q * (n - 1)
    lo = min(int(pos), n - 1)
    hi = min(lo + 1, n - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@register
class VRA(Detector):
    """VRA: ``logsumexp(W clip(h, lo, hi) + b)`` with ``lo`` / ``hi`` percentiles of ID activations.

    Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for Out-of-distribution
    Detection", NeurIPS 2023, arXiv:2302.11716. Both peers implement the two-sided clip
    ``clip(h, lo, hi)`` (the paper's full VRA also zeroes activations below ``lo`` and adds an
    offset in between; no peer does, and neither does this class).

    ``variant="pytorch_ood"`` (default, pytorch-ood 0.4 ``VRA``): *element-wise* thresholds, the
    ``lower`` / ``upper`` percentiles of each feature unit over the ID fit data (vectors ``lo``,
    ``hi`` of size D); defaults 1 / 99. pytorch-ood clips whatever its ``backbone`` returns
    (its example: C x H x W maps before the pool); normscore clips the pooled penultimate
    features, i.e. pytorch-ood with ``backbone`` = the encoder up to the pooled features.
    ``variant="openood"`` (OpenOOD v1.5 ``vra_postprocessor.py``): *one global* pair, the
    percentiles of all ID activation values (samples x units); defaults 10 / 90. ``None``
    percentiles take the variant's defaults; the search space is both peers' sweep.

    Percentiles come from a uniform sample of at most ``2**22`` values (whole rows, chosen by a
    hash of the row's position as in ReAct; exact when the fit split is smaller). The fit keeps
    the column-sorted sample (``sorted_activations_``, at most 16 MB) and the global quantile
    table, so percentiles and the variant change without refitting.
    """

    name = "vra"
    paper = "Xu, Lian, Liu & Tao, NeurIPS 2023, arXiv:2302.11716"
    formula = "logsumexp(W clip(h, lo, hi) + b), lo/hi = ID percentiles (per unit or global)"
    needs_fit = True
    constraints = {
        "lower_percentile": Interval(0.0, 100.0, allow_none=True),
        "upper_percentile": Interval(0.0, 100.0, allow_none=True),
        "variant": OneOf(tuple(_DEFAULTS)),
    }
    search_space = {
        "upper_percentile": [85, 90, 95, 99],
        "lower_percentile": [1, 5, 10, 15],
        "variant": ["pytorch_ood", "openood"],
    }

    def __init__(
        self,
        lower_percentile: float | None = None,
        upper_percentile: float | None = None,
        variant: str = "pytorch_ood",
    ) -> None:
        super().__init__()
        self.lower_percentile = lower_percentile
        self.upper_percentile = upper_percentile
        self.variant = variant

    def _check_params(self) -> None:
        super()._check_params()
        lo, hi = self.percentiles
        if lo > hi:
            raise ConfigError(
                f"vra: lower_percentile ({lo}) must not exceed upper_percentile ({hi}); "
                f"the {self.variant!r} defaults are {_DEFAULTS[self.variant]}."
            )

    @property
    def percentiles(self) -> tuple[float, float]:
        """``(lower, upper)`` in percent, the variant's defaults filled in."""
        dlo, dhi = _DEFAULTS[self.variant]
        lo = dlo if self.lower_percentile is None else float(self.lower_percentile)
        hi = dhi if self.upper_percentile is None else float(self.upper_percentile)
        return lo, hi

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=False, penultimate=True)

    _fit_state = (("_sample", "merge"),)

    def _fit_begin(self, adapter) -> None:
        self._adapter_fit = adapter
        self._sample: RowSample | None = None

    def _fit_update(self, feats: Features) -> None:
        h = feats.require("penultimate").float()
        if self._sample is None:
            self._sample = RowSample(sample_rows_for(h.shape[1]), salt=11)
        self._sample.add(h, feature_positions(feats, self._sample.seen))

    def _fit_end(self) -> None:
        if self._sample is None:
            raise InputError("vra saw no fit samples.")
        rows = self._sample.rows()
        self.sorted_activations_ = torch.sort(rows, dim=0).values
        self.activation_quantiles_ = quantile_table(rows)
        self.n_sampled_rows_ = int(rows.shape[0])
        self.W_, self.b_ = self._adapter_fit.head_weight_bias()
        del self._sample, self._adapter_fit

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``: float32 vectors ``[D]`` (pytorch_ood) or scalars ``[]`` (openood)."""
        lo, hi = self.percentiles
        if self.variant == "openood":
            t = self.activation_quantiles_
            return self._memo(
                "global",
                (t, lo, hi),
                lambda: (
                    torch.tensor(percentile_from_table(t, lo), dtype=torch.float32),
                    torch.tensor(percentile_from_table(t, hi), dtype=torch.float32),
                ),
            )
        s = self.sorted_activations_
        return self._memo(
            "elementwise",
            (s, lo, hi),
            lambda: (_column_quantiles(s, lo / 100.0).float(), _column_quantiles(s, hi / 100.0).float()),
        )

    def clip(self, h: torch.Tensor) -> torch.Tensor:
        """The clipped features of ``[B, D]`` features ``h``."""
        lo, hi = self.thresholds()
        h = h.float()
        return torch.minimum(torch.maximum(h, lo.to(h.device)), hi.to(h.device))

    def score_features(self, feats: Features) -> torch.Tensor:
        w, b = _head(self)
        return _energy_of(self.clip(feats.require("penultimate")), w, b)
