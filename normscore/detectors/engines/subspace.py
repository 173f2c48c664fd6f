"""Streamed linear algebra: orthonormalisation and randomized subspace iteration.

:func:`randomized_subspace` is randomized subspace iteration (Halko, Martinsson & Tropp, SIAM
Review 2011) on a *streamed* operator (:class:`StreamedOperator`) that only provides ``A @ P``
and ``A^T @ Y`` passes, so an ``N x dim`` matrix (LDG: all per-sample gradients) is never
materialised. Orthonormalisation (:func:`orthonormalize`) uses float64 Gram matrices, so
sample-space Grams can be all-reduced when the rows are sharded over ``torch.distributed`` ranks.
"""

from __future__ import annotations

import torch

from ...errors import ConfigError, InputError
from ...stats import all_reduce_sum

__all__ = ["DenseOperator", "StreamedOperator", "orthonormalize", "randomized_subspace"]


def orthonormalize(
    p: torch.Tensor, *, rows_distributed: bool = False, rounds: int = 2, rtol: float = 1e-10, chunk: int = 4096
) -> torch.Tensor:
    """Orthonormal basis of the columns of ``p`` ``[n, l]`` via Gram eigendecompositions.

    ``p <- p U diag(lambda^-1/2)`` (repeated ``rounds`` times: the second round restores
    orthogonality to working precision); directions with ``lambda <= rtol * lambda_max`` are
    dropped, so the result may have fewer columns. The Gram matrix is accumulated in float64
    from GEMMs over row chunks of ``chunk`` rows (in ``p``'s dtype), and ``p`` is updated in
    place when no column is dropped. With ``rows_distributed`` the rows are shards on several
    ranks and the Gram matrix is all-reduced.
    """
    for _ in range(rounds):
        l_ = p.shape[1]
        gram = torch.zeros(l_, l_, dtype=torch.float64, device=p.device)
        for r in range(0, p.shape[0], chunk):
            blk = p[r : r + chunk]
            gram += (blk.T @ blk).double()
        if rows_distributed:
            all_reduce_sum(gram)
        evals, evecs = torch.linalg.eigh(gram)
        keep = evals > max(float(evals[-1]), 0.0) * rtol
        if not bool(keep.any()):
            return p[:, :0]
        t = (evecs[:, keep] * evals[keep].rsqrt()[None, :]).flip(1)  # largest first
        out = p if t.shape[1] == l_ else torch.empty(p.shape[0], t.shape[1], dtype=p.dtype, device=p.device)
        tt = t.to(p.dtype)
        step = max(chunk, 1 << 16)
        for r in range(0, p.shape[0], step):
            out[r : r + step] = p[r : r + step] @ tt
        p = out
    return p


class StreamedOperator:
    """Interface of :func:`randomized_subspace`: a matrix ``A`` ``[n, dim]`` seen in passes.

    ``matmat(P)`` returns ``A @ P`` ``[n, l]`` (rows local to this rank; ``P`` must be left
    unchanged); ``rmatmat(Y, out)`` writes ``A^T @ Y`` into ``out`` ``[dim, l]`` (summed over
    ranks).
    """

    dim: int
    n: int
    #: rows of ``A`` held by this rank under torch.distributed (default: all ``n``)
    n_local: int | None = None
    #: upper bound on rank(A) (default ``min(n, dim)``; e.g. ``n - 1`` for centred rows)
    max_rank: int | None = None
    rows_distributed: bool = False
    #: optional bool mask [dim]: columns of A that can be non-zero (others are exactly zero)
    support: torch.Tensor | None = None

    def matmat(self, p: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def rmatmat(self, y: torch.Tensor, out: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class DenseOperator(StreamedOperator):
    """A dense matrix streamed in row blocks (tests and small problems)."""

    def __init__(self, a: torch.Tensor, block: int = 64) -> None:
        self.a = a
        self.dim = a.shape[1]
        self.n = a.shape[0]
        self.block = block
        self.passes = 0

    def matmat(self, p: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        return torch.cat([self.a[r : r + self.block] @ p for r in range(0, self.n, self.block)])

    def rmatmat(self, y: torch.Tensor, out: torch.Tensor) -> None:
        self.passes += 1
        out.zero_()
        for r in range(0, self.n, self.block):
            out += self.a[r : r + self.block].T @ y[r : r + self.block].to(out.dtype)


def randomized_subspace(
    op: StreamedOperator,
    k: int,
    *,
    oversample: int = 10,
    n_iter: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` right singular vectors of a streamed ``A`` by randomized subspace iteration.

    ``P_0 = Gaussian [dim, l]`` with ``l = min(k + oversample, rank bound)``, ``Y = A P_0``; then
    ``n_iter`` times ``P = orth(A^T orth(Y))``, ``Y = A P``; finally Rayleigh-Ritz on
    ``Y = A P``: ``Y^T Y = W S^2 W^T``, ``V = P W``. Passes over the data: ``2 * n_iter + 1``.
    When ``l`` reaches the rank bound (few samples), one ``A^T`` pass from a random
    sample-space block spans the whole row space and the result is exact in 2 passes. Halko,
    Martinsson & Tropp, SIAM Review 53(2), 2011, Alg. 4.4 with Gram-based orthonormalisation.

    Returns ``(V [dim, k], s [k], A V [n, k])``; if ``A`` has rank ``r < k`` the last ``k - r``
    columns are zero (and their singular values 0).
    """
    if k < 1:
        raise ConfigError(f"need at least one component, got k={k}")
    rank = min(op.n, op.dim) if op.max_rank is None else op.max_rank
    if k > min(op.n, op.dim):
        raise InputError(f"cannot extract {k} components from {op.n} samples of dimension {op.dim}.")
    l_ = max(1, min(k + max(int(oversample), 0), rank))
    g = torch.Generator().manual_seed(int(seed))
    step = 1 << 16
    if l_ >= rank:
        # l covers the whole row space: one A^T pass from any full-rank sample-space block spans
        # range(A^T) exactly, so a single iteration is exact (no parameter-space Gaussian).
        rank_id = torch.distributed.get_rank() if op.rows_distributed else 0
        g.manual_seed(int(seed) + 7919 * rank_id)
        y = torch.randn(op.n_local if op.n_local is not None else op.n, l_, generator=g, dtype=torch.float64)
        n_iter = 1
        p = torch.empty(op.dim, l_, dtype=dtype, device=device)
    else:
        p = torch.empty(op.dim, l_, dtype=dtype, device=device)
        for r in range(0, op.dim, step):
            p[r : r + step] = torch.randn(min(step, op.dim - r), l_, generator=g).to(dtype)
        if op.support is not None:
            p[~op.support.to(p.device)] = 0
        if int(n_iter) == 0:
            p = orthonormalize(p)  # otherwise only its span matters: it is re-orthonormalised below
        y = op.matmat(p).double()
    for _ in range(int(n_iter)):
        q = orthonormalize(y, rows_distributed=op.rows_distributed)
        if q.shape[1] < p.shape[1]:
            p = torch.empty(op.dim, q.shape[1], dtype=dtype, device=p.device)
        op.rmatmat(q.to(dtype), p)
        p = orthonormalize(p)
        y = op.matmat(p).double()
    gram = y.T @ y
    if op.rows_distributed:
        all_reduce_sum(gram)
    evals, w = torch.linalg.eigh(gram)
    evals, w = evals.flip(0).clamp_min(0), w.flip(1)
    r = min(k, w.shape[1])
    v = torch.zeros(op.dim, k, dtype=dtype, device=device)
    wk = w[:, :r]
    wk32 = wk.to(dtype=dtype, device=p.device)
    for s0 in range(0, op.dim, step):
        v[s0 : s0 + step, :r] = p[s0 : s0 + step] @ wk32
    ylow = torch.zeros(y.shape[0], k, dtype=torch.float64)
    ylow[:, :r] = y @ wk.to(y.device)
    s = torch.zeros(k, dtype=torch.float64)
    s[:r] = evals[:r].sqrt()
    return v, s, ylow
