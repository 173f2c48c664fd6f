"""Mergeable streaming statistics in float64, reducible across ``torch.distributed`` ranks.

* :class:`RunningMoments` - count, mean and scatter matrix (full or diagonal) with Chan et al.'s
  pairwise merge; ``update`` is a merge of the batch's exact moments, so results do not depend
  on how the data is batched beyond float64 rounding.
* :class:`ClassMoments` - per-class counts and sums plus the shared within-class scatter (for
  Mahalanobis / RMDS / class means), accumulated on data shifted by a fixed reference point to
  avoid cancellation.
* :func:`all_reduce_sum` - sums tensors over ranks when ``torch.distributed`` is initialised
  (no-op otherwise). Moments are reduced by summing their raw (shifted) power sums, which is
  exact and order-independent.

Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983.
"""

from __future__ import annotations

import torch

__all__ = ["ClassMoments", "RunningMoments", "all_gather_cat", "all_reduce_sum", "distributed_active"]


def distributed_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """In-place sum over all ranks (no-op without an initialised process group)."""
    if not distributed_active():
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (``[n_rank, ...]``, sizes may differ) from all ranks in rank order."""
    if not distributed_active():
        return t
    world = torch.distributed.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    buf = [torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in range(world)]
    torch.distributed.all_gather(buf, torch.cat([t, pad]).contiguous())
    return torch.cat([b[: int(s)] for b, s in zip(buf, sizes)])


def all_reduce_int(v: int) -> int:
    if not distributed_active():
        return v
    t = torch.tensor([v], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return int(t.item())


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


class RunningMoments:
    """Streaming count / mean / scatter ``sum (x - mean)(x - mean)^T`` of vectors ``[B, D]``."""

    def __init__(self, dim: int, *, diagonal: bool = False, device: torch.device | str | None = None) -> None:
        self.dim = dim
        self.diagonal = diagonal
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim if diagonal else (dim, dim), dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = _f64(x).reshape(-1, self.dim).to(self.mean.device)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        m2b = (xc * xc).sum(0) if self.diagonal else xc.T @ xc
        self._merge(nb, mb, m2b)

    def _merge(self, nb: int, mb: torch.Tensor, m2b: torch.Tensor) -> None:
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb.clone(), m2b.clone()
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        corr = delta * delta if self.diagonal else torch.outer(delta, delta)
        self.m2 = self.m2 + m2b + corr * (self.n * nb / n)
        self.n = n

    def merge(self, other: RunningMoments) -> None:
        if other.n:
            self._merge(other.n, other.mean, other.m2)

    def all_reduce(self) -> None:
        """Combine the moments of every rank (exact: via power sums around a common point)."""
        if not distributed_active():
            return
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.mean.device)
        s1 = self.mean * self.n
        # raw second moment around 0 of this rank's data
        s2 = self.m2 + (self.mean * self.mean if self.diagonal else torch.outer(self.mean, self.mean)) * self.n
        all_reduce_sum(n, s1, s2)
        self.n = int(n.item())
        self.mean = s1 / max(self.n, 1)
        outer = self.mean * self.mean if self.diagonal else torch.outer(self.mean, self.mean)
        self.m2 = s2 - outer * self.n

    def covariance(self, ddof: int = 0) -> torch.Tensor:
        if self.n - ddof <= 0:
            raise ValueError(f"need more than {ddof} samples for a covariance, have {self.n}")
        return self.m2 / (self.n - ddof)


class ClassMoments:
    """Per-class counts and means plus the pooled within-class scatter of ``[B, D]`` features.

    The scatter is ``S_w = sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T``, accumulated as
    ``sum (x - r)(x - r)^T - sum_c n_c (mu_c - r)(mu_c - r)^T`` around a reference point ``r``
    (the mean of the first batch), which keeps float64 cancellation negligible.
    """

    def __init__(self, num_classes: int, dim: int, *, device: torch.device | str | None = None) -> None:
        self.num_classes = num_classes
        self.dim = dim
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.raw2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.ref: torch.Tensor | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = _f64(x).to(self.sums.device)
        y = y.to(self.sums.device).long()
        if x.shape[0] == 0:
            return
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}); got range [{int(y.min())}, {int(y.max())}]")
        if self.ref is None:
            self.ref = x.mean(0)
        xs = x - self.ref
        self.counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        self.sums.index_add_(0, y, xs)
        self.raw2 += xs.T @ xs

    def all_reduce(self) -> None:
        if not distributed_active():
            return
        # a common reference point: move every rank's sums to r = 0 first
        ref = self.ref if self.ref is not None else torch.zeros(self.dim, dtype=torch.float64, device=self.sums.device)
        n = self.counts.sum()
        tot = self.sums.sum(0)
        self.raw2 += torch.outer(tot, ref) + torch.outer(ref, tot) + n * torch.outer(ref, ref)
        self.sums += self.counts[:, None] * ref[None, :]
        self.ref = torch.zeros_like(ref)
        all_reduce_sum(self.counts, self.sums, self.raw2)

    @property
    def n(self) -> int:
        return int(self.counts.sum().item())

    def means(self) -> torch.Tensor:
        """Class means ``[C, D]`` (NaN rows for classes without samples)."""
        ref = self.ref if self.ref is not None else 0.0
        return self.sums / self.counts[:, None] + ref

    def within_scatter(self) -> torch.Tensor:
        present = self.counts > 0
        mu_s = self.sums[present] / self.counts[present, None]
        return self.raw2 - (mu_s * self.counts[present, None]).T @ mu_s

    def total_moments(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(n, mean, scatter)`` of all samples pooled (class-agnostic)."""
        n = self.counts.sum()
        ref = self.ref if self.ref is not None else torch.zeros(self.dim, dtype=torch.float64, device=self.sums.device)
        s = self.sums.sum(0)
        m = s / n
        return int(n.item()), m + ref, self.raw2 - n * torch.outer(m, m)
