"""Streamed passes of per-sample gradients over a detector's fit split (LDG's fit engine).

* :class:`GradPasses` - deterministic, capped passes over the fit split, each checked against
  the first (LDG needs the same samples in the same order every time);
* :class:`GradOperator` - the matrix ``A = (G - 1 mu^T) diag(s)`` of NFK-normalised per-sample
  gradients, seen only through ``A @ P`` and ``A^T @ Y`` passes (for
  :func:`~normscore.detectors.engines.subspace.randomized_subspace`);
* :class:`GradStats` - the first pass's consumer: gradient moments (a dense covariance or
  per-layer diagonals) and class sums.

Under ``torch.distributed`` the fit rows are sharded over ranks; :meth:`GradOperator.rmatmat`
is a collective matmul (``sync.reduce``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ...errors import InputError
from ...stats import RunningMoments
from ...stream import Batch, FitStream
from ...taps import CaptureSpec, capture
from .. import sync
from .persample import LayerMap
from .subspace import StreamedOperator

__all__ = ["GradOperator", "GradPasses", "GradStats", "update_diag"]

_FP_TOL = 1e-4


class GradPasses:
    """Deterministic, capped passes over the fit split, with an order check between passes."""

    def __init__(self, stream: FitStream, cap: int | None) -> None:
        self.stream = stream
        self.cap = cap
        self.fingerprint: torch.Tensor | None = None

    def batches(self) -> Iterator[tuple[int, Batch]]:
        seen = 0
        for b in self.stream.inputs(split="fit"):
            if self.cap is not None and seen >= self.cap:
                break
            if self.cap is not None and seen + b.x.shape[0] > self.cap:
                keep = self.cap - seen
                b = Batch(b.x[:keep], b.y[:keep] if b.y is not None else None, b.index[:keep])
            yield seen, b
            seen += b.x.shape[0]

    def check(self, row0: int, logits: torch.Tensor) -> None:
        assert self.fingerprint is not None
        f = torch.logsumexp(logits.double().cpu(), dim=1)
        ref = self.fingerprint[row0 : row0 + f.shape[0]]
        if ref.shape != f.shape or not torch.allclose(f, ref, rtol=_FP_TOL, atol=_FP_TOL):
            raise InputError(
                "ldg makes several passes over the fit loader and needs the same samples in the same "
                "order every time, but this pass differs from the first one (is the loader shuffled or "
                "randomly augmented?). Use a deterministic loader (shuffle=False, no random transforms)."
            )


class GradOperator(StreamedOperator):
    """``A = (G - 1 mu^T) diag(s)`` over the fit split: rows are NFK-normalised gradients."""

    def __init__(
        self,
        lmap: LayerMap,
        adapter,
        passes: GradPasses,
        mean: torch.Tensor,
        inv_std: torch.Tensor,
        n: int,
        n_local: int,
        device: torch.device,
    ) -> None:
        self.lmap = lmap
        self.adapter = adapter
        self.passes = passes
        self.mean = mean.float().to(device)
        self.s = inv_std.float().to(device)
        self.dim = lmap.dim
        self.n = n  # all ranks
        self.n_local = n_local  # rows of this rank
        self.rows_distributed = sync.distributed()
        self.support = self.s > 0
        self.max_rank = min(n - 1, int(self.support.sum()))  # centred rows
        self._unscale = torch.where(self.support, 1.0 / self.s.clamp_min(1e-30), torch.zeros_like(self.s))

    def _slices(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t[o : o + d] for o, d in zip(self.lmap.offsets, self.lmap.dims)]

    def matmat(self, p: torch.Tensor) -> torch.Tensor:
        p.mul_(self.s[:, None])
        try:
            mu_term = torch.zeros(p.shape[1], dtype=torch.float64, device=p.device)
            for r in range(0, p.shape[0], 4096):
                mu_term += (self.mean[r : r + 4096] @ p[r : r + 4096]).double()
            mu_term = mu_term.cpu()
            y = torch.empty(self.n_local, p.shape[1], dtype=torch.float64)
            for row0, b in self.passes.batches():
                spec = CaptureSpec(logits=True, backward=self.lmap.projection_spec(p, "y"))
                f = capture(self.adapter, b.x, spec, validated=True)
                self.passes.check(row0, f["logits"])
                y[row0 : row0 + b.x.shape[0]] = f["y"].double().cpu() - mu_term
        finally:
            p.mul_(self._unscale[:, None])
        return y

    def rmatmat(self, y: torch.Tensor, out: torch.Tensor) -> None:
        out.zero_()
        views = self._slices(out)
        yd = y.to(out.dtype)
        rows = [0]

        def consumer(i: int, r0: int, feats: torch.Tensor) -> None:
            r = rows[0] + r0
            views[i].addmm_(feats.t(), yd[r : r + feats.shape[0]].to(feats.device))

        for row0, b in self.passes.batches():
            rows[0] = row0
            f = self.lmap.run(self.adapter, b.x, consumer)
            self.passes.check(row0, f["logits"])
        ysum = y.double().sum(0)
        sync.reduce((out, ysum), "sum")  # a collective matmul: the rows are sharded over ranks
        out.addr_(self.mean, ysum.to(out.device, out.dtype), alpha=-1.0)
        out.mul_(self.s[:, None])


def update_diag(rm: RunningMoments, x: torch.Tensor) -> None:
    """Merge a chunk's diagonal moments, computed in float32 (only the [d] vectors go to
    float64), into ``rm`` - cheaper than ``rm.update`` for wide gradient chunks."""
    nb = x.shape[0]
    mb = x.mean(0)
    m2b = ((x - mb) ** 2).sum(0)
    part = RunningMoments(rm.dim, diagonal=True)
    part.n, part.mean, part.m2 = nb, mb.double(), m2b.double()
    rm.merge(part)


class GradStats:
    """Pass-1 consumer: NFK moments (dense covariance or per-layer diagonal) and class sums."""

    def __init__(self, lmap, rm_full, rms, csum, onehot, bsz) -> None:
        self.lmap, self.rm_full, self.rms, self.csum, self.onehot = lmap, rm_full, rms, csum, onehot
        self.offs = lmap.offsets
        self.phi = torch.zeros(bsz, lmap.dim) if rm_full is not None else None
        self.bufs: dict[int, torch.Tensor] = {}
        self.bsz = bsz

    def __call__(self, i: int, r0: int, feats: torch.Tensor) -> None:
        fc = feats.cpu()
        o, d = self.offs[i], self.lmap.dims[i]
        rows = slice(r0, r0 + fc.shape[0])
        if self.phi is not None:
            self.phi[rows, o : o + d] += fc
        elif self.lmap.slots[i].calls > 1:  # shared layer: sum its calls before the moments
            buf = self.bufs.get(i)
            if buf is None:
                buf = self.bufs[i] = torch.zeros(self.bsz, d)
            buf[rows] += fc
        else:
            update_diag(self.rms[i], fc)
        if self.onehot is not None:
            self.csum[o : o + d].addmm_(fc.t(), self.onehot[rows])

    def finish(self) -> None:
        for i, buf in self.bufs.items():
            update_diag(self.rms[i], buf)
        if self.phi is not None:
            self.rm_full.update(self.phi)
