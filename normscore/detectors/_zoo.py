"""Shared pieces of the detector zoo: deterministic row sampling, quantiles, energies, caches.

Nothing here is public API. Two properties matter for every user of this module:

* **batch-size invariance of the fit**: sampling decisions depend only on a row's position in
  the fit stream (a counter-based hash), never on how the stream is batched;
* **bounded memory**: :class:`RowSample` keeps at most ``capacity`` rows of a stream, a uniform
  sample without replacement (bottom-k by hash priority), so percentiles and means that cannot
  be accumulated exactly in one pass are estimated from a sample of documented size (and are
  exact when the whole fit split fits in the sample).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..hashing import splitmix64
from ..runmode import tracing
from ..taps import Features

#: Budget of the row samples (number of float values, i.e. rows x feature dimension): 2**22
#: values (16 MB in float32). With 2048-d features this keeps 2048 rows, with 128-d features
#: 32768 rows. Fits on fewer rows than the sample holds are exact.
SAMPLE_VALUES = 2**22


def sample_rows_for(dim: int, values: int = SAMPLE_VALUES) -> int:
    return max(1, values // max(1, dim))


def _unit(z: np.ndarray) -> torch.Tensor:
    """The top 53 bits of uint64 hashes as floats in ``[0, 1)``."""
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53))


def hash_positions(pos: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """:func:`hash_uniform` of arbitrary (global) positions ``pos`` (int64 ``[n]``)."""
    return _unit(splitmix64(pos.detach().cpu().numpy().astype(np.uint64), salt))


def feature_positions(feats: Mapping[str, torch.Tensor], start: int) -> torch.Tensor:
    """Global positions of a fit batch: ``feats["index"]`` when the fit supplies it (always
    inside ``fit``), else ``start .. start + B - 1``."""
    idx = feats.get("index")
    if idx is not None:
        return idx.long()
    n = next(iter(feats.values())).shape[0]
    return torch.arange(start, start + n)


def hash_uniform(start: int, n: int, salt: int = 0) -> torch.Tensor:
    """Uniform numbers in ``[0, 1)`` (float64 ``[n]``) for stream positions ``start..start+n-1``.

    SplitMix64 of the position (plus ``salt``): a deterministic function of the position only,
    so the same rows are chosen whatever the batch size.
    """
    return _unit(splitmix64(np.arange(start, start + n, dtype=np.uint64), salt))


class RowSample:
    """A uniform sample (without replacement) of at most ``capacity`` rows of a stream.

    Row ``t`` (its position in the stream) gets the priority ``hash_uniform(t)``; the sample is
    the ``capacity`` rows with the smallest priorities (a bottom-k sketch). The result depends
    only on the rows and their order, not on the batching; :meth:`rows` returns the kept rows in
    stream order. Only rows that beat the current worst priority are copied, so the cost per
    batch is small once the sample is full.
    """

    def __init__(self, capacity: int, salt: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = int(capacity)
        self.salt = salt
        self.seen = 0
        self._rows: torch.Tensor | None = None
        self._prio: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None

    def add(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Add rows; ``positions`` are their global stream positions (default: a local counter)."""
        x = x.detach()
        n = x.shape[0]
        if n == 0:
            return
        if positions is None:
            pos = torch.arange(self.seen, self.seen + n, device=x.device)
        else:
            pos = positions.to(device=x.device, dtype=torch.long)
        prio = hash_positions(pos, self.salt).to(x.device)
        self.seen += n
        if self._rows is None:
            keep = min(n, self.capacity)
            order = torch.argsort(prio)[:keep] if n > keep else torch.arange(n, device=x.device)
            self._rows, self._prio, self._pos = x[order].clone(), prio[order], pos[order]
            return
        assert self._prio is not None and self._pos is not None
        free = self.capacity - self._rows.shape[0]
        if free > 0:  # still filling: append the best `free` rows, then treat the rest below
            order = torch.argsort(prio)
            take, rest = order[:free], order[free:]
            self._rows = torch.cat([self._rows, x[take]])
            self._prio = torch.cat([self._prio, prio[take]])
            self._pos = torch.cat([self._pos, pos[take]])
            if rest.numel() == 0:
                return
            x, prio, pos = x[rest], prio[rest], pos[rest]
        worst = self._prio.max()
        cand = prio < worst
        if not bool(cand.any()):
            return
        x, prio, pos = x[cand], prio[cand], pos[cand]
        k = prio.numel()
        allp = torch.cat([self._prio, prio])
        # the k largest priorities of the union leave; candidates among them never enter
        out = torch.topk(allp, k).indices
        leaving = out[out < self.capacity]
        entering = torch.ones(k, dtype=torch.bool, device=x.device)
        entering[out[out >= self.capacity] - self.capacity] = False
        idx = entering.nonzero().flatten()
        self._rows[leaving] = x[idx]
        self._prio[leaving] = prio[idx]
        self._pos[leaving] = pos[idx]

    #: a ``"merge"`` fit state (:mod:`~normscore.detectors.sync`): every rank's kept rows are
    #: gathered, then :meth:`_after_sync` keeps the union's ``capacity`` smallest priorities, i.e.
    #: the sample a single process would have kept
    _fit_state = (("_rows", "cat"), ("_prio", "cat"), ("_pos", "cat"))

    def _after_sync(self) -> None:
        assert self._rows is not None and self._prio is not None and self._pos is not None
        keep = torch.argsort(self._prio)[: self.capacity]
        self._rows, self._prio, self._pos = self._rows[keep], self._prio[keep], self._pos[keep]

    def rows(self) -> torch.Tensor:
        """The kept rows in stream order."""
        if self._rows is None:
            raise InputError("no rows were seen during the fit (the fit split is empty).")
        assert self._pos is not None
        return self._rows[torch.argsort(self._pos)]


# ---------------------------------------------------------------------------------------------
# quantiles

#: Resolution of the stored quantile tables: 10001 levels, one per 0.01 percentile.
QUANTILE_LEVELS = 10001


def quantile_sorted(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantiles (numpy's default ``method="linear"``) of sorted ``s``.

    ``q`` in ``[0, 1]``; computed in float64.
    """
    s = s.double()
    n = s.numel()
    if n == 0:
        raise InputError("cannot take a percentile of no values.")
    pos = q.double().to(s.device) * (n - 1)
    lo = pos.floor().clamp(0, n - 1).long()
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.double()
    return s[lo] + (s[hi] - s[lo]) * frac


def quantile(x: torch.Tensor, q: float) -> float:
    """The ``q``-quantile (``q`` in [0, 1]) of all values of ``x``, numpy ``linear`` method."""
    s, _ = torch.sort(x.detach().flatten().double())
    return float(quantile_sorted(s, torch.tensor([q], dtype=torch.float64))[0])


def quantile_table(values: torch.Tensor) -> torch.Tensor:
    """Quantiles of ``values`` at the ``QUANTILE_LEVELS`` levels 0, 0.0001, ..., 1 (float64)."""
    s, _ = torch.sort(values.detach().flatten().double())
    levels = torch.linspace(0.0, 1.0, QUANTILE_LEVELS, dtype=torch.float64)
    return quantile_sorted(s, levels)


def percentile_from_table(table: torch.Tensor, percentile: float) -> float:
    """Read the ``percentile`` (0-100) from a :func:`quantile_table`.

    Exact for percentiles on the 0.01 grid; linear interpolation between grid levels otherwise.
    """
    pos = float(percentile) * (QUANTILE_LEVELS - 1) / 100.0
    r = round(pos)
    if abs(pos - r) < 1e-6:
        return float(table[int(r)])
    lo = int(np.floor(pos))
    hi = min(lo + 1, QUANTILE_LEVELS - 1)
    f = pos - lo
    return float(table[lo] + (table[hi] - table[lo]) * f)


# ---------------------------------------------------------------------------------------------
# small helpers


def energy(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z)`` per row (the negative free energy at temperature 1)."""
    return torch.logsumexp(logits, dim=1)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (zero rows stay zero)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def check_labels(y: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    y = y.long()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"{name} needs class labels in [0, {num_classes}) (the model has {num_classes} classes); "
            f"the loader yielded labels in [{int(y.min())}, {int(y.max())}]. Fit on labelled ID "
            "training data of the model's own classes."
        )
    return y


class FeatureMean:
    """Streamed float64 mean of the penultimate features, a ``"merge"`` fit state summed over
    ranks under ``torch.distributed`` (DICE's ``mean(h)``, fDBD's ``mu_train``)."""

    _fit_state = (("sum", "sum"), ("n", "sum"))

    def __init__(self, detector: str) -> None:
        self.detector = detector
        self.sum: torch.Tensor | None = None
        self.n = 0

    def update(self, feats: Features) -> None:
        h = feats.require("penultimate").double()
        s = h.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.n += h.shape[0]

    def mean(self) -> torch.Tensor:
        if self.sum is None or self.n == 0:
            raise InputError(f"{self.detector} saw no fit samples.")
        return self.sum / self.n


def _version(t: Any) -> int | None:
    """In-place version counter of a tensor (``None`` for non-tensors and inference tensors)."""
    if not isinstance(t, torch.Tensor) or t.is_inference():
        return None
    return t._version


class LazyCache:
    """Caches one derived value; rebuilt when its key changes.

    Key items that are tensors are compared by identity and by their in-place version counter
    (the cache holds a reference, so an identity match means the very same tensor, and the
    version catches in-place updates such as an optimizer step on a head weight); other items
    by equality. Fitted tensors get new identities on ``fit``, ``load_state_dict`` and
    ``to(device)``, so derived values are rebuilt exactly when they must be. Values computed
    while tracing (``torch.jit.trace``, ``torch.compile``, ``torch.export``) are returned but
    never stored: they may be symbolic.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._versions: tuple | None = None
        self._value: Any = None

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        if len(a) != len(b):
            return False
        for u, v in zip(a, b):
            if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
                if u is not v:
                    return False
            elif type(u) is not type(v) or u != v:
                return False
        return True

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        versions = tuple(_version(k) for k in key)
        if self._key is None or not self._same(self._key, key) or self._versions != versions:
            value = build()
            if tracing():
                return value
            self._value, self._key, self._versions = value, key, versions
        return self._value

    def clear(self) -> None:
        self._key = None
        self._versions = None
        self._value = None

    # a copied detector starts with an empty cache (values such as faiss indices do not copy)
    def __deepcopy__(self, memo: dict) -> LazyCache:
        return LazyCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
