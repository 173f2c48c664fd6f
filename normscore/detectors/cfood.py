"""CFOOD: OpenOOD v1.5's reverse-neighbourhood score on L2-normalised features."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..taps import Features
from .base import Detector
from .constraints import Interval
from .distances import _Bank
from .registry import register

__all__ = ["CFOOD"]

#: OpenOOD's grid of neighbourhood sizes (fractions of the reference set)
_KVAL = np.concatenate((np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49)))


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kval, kpos)`` for a reference set of ``n`` rows: OpenOOD's grid, positions
    ``int(kval n - 1)`` (truncated), repeated positions dropped."""
    kpos = np.array(_KVAL * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    return torch.from_numpy(_KVAL[keep].copy()), torch.from_numpy(kpos[keep].copy())


def _sq_dists(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[B, n]`` in float64."""
    q, r = q.double(), r.double()
    d = (q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * q @ r.T
    return d.clamp_min(0.0)


@register
class CFOOD(_Bank):
    """CFOOD (OpenOOD v1.5 ``cfood_postprocessor.py``): ``-kappa(x)``, the smallest neighbourhood
    size at which ``x`` falls inside the neighbourhoods of a share ``k`` of the ID references.

    On L2-normalised penultimate features ``v = h / (||h|| + 1e-10)`` and a reference set
    ``R = {r_1..r_n}`` of ID fit features: for each grid value ``kappa`` (OpenOOD's 212-228
    fractions from 0.001 to 0.99) let ``rho_i(kappa)`` be the squared distance from ``r_i`` to
    its ``(int(kappa n - 1) + 1)``-th nearest other reference. Then
    ``count(kappa) = (1/n) #{i : rho_i(kappa) >= ||v - r_i||^2}`` (the share of references
    whose kappa-neighbourhood contains ``v``) and ``kappa(x)`` is the smallest grid value with
    ``count >= k`` (1 when none). ID points sit in small neighbourhoods of many references
    (``kappa`` small), OOD points only in large ones. A reverse-k-NN / conformal-rank density
    score; OpenOOD ships it without a paper reference.

    Written from OpenOOD's code (the class has no paper; see its docstring): ``alpha`` is the
    share of fit rows in the reference set, ``k`` the share of references. Deviations, all
    documented: the reference rows are a hash-of-position Bernoulli(``alpha``) sample (OpenOOD:
    ``randperm``, exactly ``int(alpha N)`` rows) so the fit does not depend on the batching;
    default ``alpha = 1.0`` (the whole fit split; OpenOOD's default 0.1 only saves memory);
    the search space of ``k`` is {0.01, 0.05, 0.1, 0.2} (OpenOOD's 0.001 and 0.005 are equal
    to 0.01 for references below 1000 rows). Distances in float64.

    Cost: the reference set is a bank (``bank_``, ``alpha N x D``) plus ``knn_dists_``
    (``alpha N x ~220`` float32); the fit computes all ``n^2`` reference distances (chunked),
    scoring ``B x n`` distances per batch.
    """

    name = "cfood"
    paper = "OpenOOD v1.5 cfood_postprocessor.py (no paper)"
    formula = "-min{kappa : (1/n) #{i : rho_i(kappa) >= ||v - r_i||^2} >= k}, v = h/||h||, rho_i = kappa-NN radius"
    needs_fit = True
    _salt = 13
    constraints = {
        "alpha": Interval(0.0, 1.0, closed="right"),
        "k": Interval(0.0, 1.0, closed="right"),
    }
    search_space = {"k": [0.01, 0.05, 0.1, 0.2], "alpha": [0.1, 0.5, 1.0]}

    def __init__(
        self,
        alpha: float = 1.0,
        k: float = 0.01,
        layer: str | list[str] = "penultimate",
        layer_aggregation: str = "concat",
    ) -> None:
        Detector.__init__(self)
        self.alpha = alpha
        self.k = k
        self.layer = layer
        self.layer_aggregation = layer_aggregation

    def capture_spec(self, adapter, stage):
        return self.layer_spec(adapter, logits=False)

    @staticmethod
    def _unit(h: torch.Tensor) -> torch.Tensor:
        h = h.float()
        return h / (h.norm(dim=1, keepdim=True) + 1e-10)

    def _bank_rows(self, feats: Features) -> torch.Tensor:
        return self._unit(self.layer_features(feats))

    def _fit_end(self) -> None:
        super()._fit_end()
        bank = self.bank_
        n = int(bank.shape[0])
        if n < 2:
            raise InputError(
                f"cfood: the reference set holds {n} vector(s) (alpha={self.alpha}); it needs at least 2. "
                "Raise alpha or fit on more data."
            )
        kval, kpos = _grid(n)
        idx = (kpos + 1).to(bank.device)
        rows = []
        step = max(1, (1 << 24) // n)
        for s in range(0, n, step):
            d = torch.sort(_sq_dists(bank[s : s + step], bank), dim=1).values
            rows.append(d[:, idx].float())
        self.knn_dists_ = torch.cat(rows)
        self.kval_ = kval

    def kappa(self, h: torch.Tensor) -> torch.Tensor:
        """``kappa(x)`` of ``[B, D]`` features (float64 ``[B]``)."""
        self._check_bank()
        bank, table, kval = self.bank_, self.knn_dists_, self.kval_
        v = self._unit(h).to(bank.device)
        n, klen = table.shape
        b = v.shape[0]
        hist = torch.zeros(b, klen + 1, dtype=torch.float64, device=bank.device)
        step = max(1, (1 << 24) // max(1, b))
        for s in range(0, n, step):
            d = _sq_dists(v, bank[s : s + step])  # [B, m]
            first = torch.searchsorted(table[s : s + step].double().contiguous(), d.T.contiguous())  # [m, B]
            hist.scatter_add_(1, first.T, torch.ones_like(first.T, dtype=torch.float64))
        count = hist[:, :klen].cumsum(1) / n
        ok = count >= float(self.k)
        anyok = ok.any(1)
        j = ok.double().argmax(1)
        kv = kval.to(bank.device)
        return torch.where(anyok, kv[j], torch.ones_like(kv[j]))

    def score_features(self, feats: Features) -> torch.Tensor:
        return (-self.kappa(self.layer_features(feats))).float()
