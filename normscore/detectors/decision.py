"""The calibrated OOD decision (a threshold on held-out ID scores) and the confidence interval of
the ID rate it accepts."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CalibrationWarning, ConfigError, InputError

__all__ = ["TPR_CONFIDENCE", "Decision", "held_out_needed", "tpr_interval"]


#: confidence level of :attr:`Decision.tpr_interval`
TPR_CONFIDENCE = 0.95


def tpr_interval(k: int, n: int, confidence: float = TPR_CONFIDENCE) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a rate from ``k`` successes in ``n`` trials."""
    from scipy.special import betaincinv  # the beta distribution's quantile function

    a = (1.0 - confidence) / 2.0
    lo = float(betaincinv(k, n - k + 1, a)) if k > 0 else 0.0
    hi = float(betaincinv(k + 1, n - k, 1.0 - a)) if k < n else 1.0
    return lo, hi


def _tpr_floor(tpr: float) -> float:
    """The lowest acceptable lower bound of the achieved TPR: the ID rejection rate ``1 - tpr``
    may be at most doubled (at least 1 point of slack, for ``tpr`` near 1)."""
    return tpr - max(1.0 - tpr, 0.01)


@functools.lru_cache(maxsize=64)
def held_out_needed(tpr: float, confidence: float = TPR_CONFIDENCE, limit: int = 20_000) -> int:
    """Held-out size from which on the interval's lower end stays above the floor
    (``tpr - max(1 - tpr, 0.01)``) when ``ceil(tpr * n)`` samples are accepted."""
    from scipy.special import betaincinv

    n = np.arange(1, limit + 1)
    k = np.minimum(n, np.ceil(tpr * n - 1e-9))
    lo = np.where(k > 0, betaincinv(np.maximum(k, 1), n - k + 1, (1.0 - confidence) / 2.0), 0.0)
    bad = np.flatnonzero(lo < _tpr_floor(tpr))
    return int(n[bad[-1]] + 1) if bad.size else 1


@dataclass(frozen=True)
class Decision:
    """A calibrated OOD decision: ``score < threshold`` means OOD.

    ``threshold`` accepts (scores >=) at least ``tpr`` of the ``n`` held-out ID samples it was
    calibrated on; ``achieved_tpr`` is the exact share accepted there. ``tpr_low`` and
    ``tpr_high`` bound the share of *new* ID data the threshold accepts: the 95% Clopper-Pearson
    interval of ``achieved_tpr`` over ``n`` samples (wide for small ``n``; computed on load for
    files saved before it was stored).
    """

    threshold: float
    tpr: float
    n: int
    achieved_tpr: float
    tpr_low: float | None = None
    tpr_high: float | None = None

    def __post_init__(self) -> None:
        if (self.tpr_low is None or self.tpr_high is None) and self.n > 0:
            lo, hi = tpr_interval(round(self.achieved_tpr * self.n), self.n)
            object.__setattr__(self, "tpr_low", lo)
            object.__setattr__(self, "tpr_high", hi)

    @staticmethod
    def calibrate(id_scores: torch.Tensor, tpr: float = 0.95, *, warn: bool = True) -> Decision:
        """The threshold keeping ``tpr`` of ``id_scores``; warns (:class:`CalibrationWarning`)
        when the held-out set is too small for it: when the share of new ID data it rejects may
        be more than twice ``1 - tpr`` at 95% confidence (for ``tpr = 0.95``: fewer than about
        140 samples; :func:`held_out_needed`)."""
        if not 0.0 < tpr <= 1.0:
            raise ConfigError(f"tpr must be in (0, 1], got {tpr}.")
        s = id_scores.detach().double().flatten().cpu()
        if s.numel() == 0:
            raise InputError("no calibration scores; cannot calibrate a threshold.")
        if not bool(torch.isfinite(s).all()):
            raise InputError("calibration scores contain NaN/Inf; cannot calibrate a threshold.")
        srt, _ = torch.sort(s)
        n = srt.numel()
        k = math.floor((1.0 - tpr) * n + 1e-9)
        k = min(max(k, 0), n - 1)
        thr = float(srt[k])
        achieved = float((s >= thr).double().mean())
        d = Decision(threshold=thr, tpr=float(tpr), n=int(n), achieved_tpr=achieved)
        if warn and d.tpr_low is not None and d.tpr_low < _tpr_floor(tpr):
            warnings.warn(
                f"the predict threshold was calibrated on only {n} held-out ID samples: at 95% "
                f"confidence it accepts between {100 * d.tpr_low:.1f}% and {100 * (d.tpr_high or 1):.1f}% "
                f"of new ID data (target {100 * tpr:g}%). For a reliable threshold use at least "
                f"{held_out_needed(tpr)} held-out samples: fit on more data (calibration= sets the "
                "held-out share) or det.calibrate(held_out_id_loader). The interval is in "
                "det.decision.tpr_low / tpr_high.",
                CalibrationWarning,
                stacklevel=2,
            )
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
