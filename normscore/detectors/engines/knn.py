"""Nearest-neighbour search over a streamed feature bank (faiss on CPU, torch matmul on GPU).

:class:`KNNBank` collects ``[N, D]`` features (optionally L2-normalised, optionally stored in
float16), builds an exact flat index (default) or an IVF index for very large banks, and
returns the distance to the k-th nearest neighbour.

* CPU: faiss ``IndexFlatL2`` (exact) or ``IndexIVFFlat`` (``index="ivf"``, trained on a sample
  of the bank; approximate, for banks over ~1M vectors).
* CUDA tensors: chunked ``q @ bank.T`` with a running ``topk`` on the device (exact).
* Without faiss installed: the same chunked torch search on the CPU.

Distances are Euclidean (not squared). For normalised features ``||a - b||^2 = 2 - 2 a.b``.
"""

from __future__ import annotations

import math

import torch

from ...errors import ConfigError, InputError
from ...runmode import tracing

__all__ = ["KNNBank"]


#: Query batches of at least this many vectors are searched by faiss with BLAS (one GEMM that
#: reads the bank once) instead of its per-query loop (which reads the bank once per query).
#: faiss 1.15's default threshold is 128,000 queries, so a scoring batch of 16 images against a
#: 50,000 x 2,048 bank took 99 ms instead of 39 ms (``benchmarks/perf.py``); below 8 queries the
#: loop is faster. Applied once, only when faiss's own setting is higher.
FAISS_BLAS_THRESHOLD = 8
_faiss_tuned = False


def _faiss():
    global _faiss_tuned
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        return None
    if not _faiss_tuned:
        _faiss_tuned = True
        if faiss.cvar.distance_compute_blas_threshold > FAISS_BLAS_THRESHOLD:
            faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD
    return faiss


class KNNBank:
    """A bank of reference vectors with k-th-nearest-neighbour distance queries."""

    def __init__(
        self,
        *,
        normalize: bool = True,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        storage_dtype: torch.dtype = torch.float32,
    ) -> None:
        if index not in ("flat", "ivf"):
            raise ConfigError(f"index must be 'flat' or 'ivf', got {index!r}.")
        if storage_dtype not in (torch.float32, torch.float16):
            raise ConfigError("storage_dtype must be torch.float32 or torch.float16.")
        self.normalize = normalize
        self.index_kind = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.storage_dtype = storage_dtype
        self._parts: list[torch.Tensor] = []
        self.bank: torch.Tensor | None = None
        self._index = None

    @staticmethod
    def _prep(x: torch.Tensor, normalize: bool) -> torch.Tensor:
        x = x.detach().float()
        if normalize:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return x

    def add(self, x: torch.Tensor) -> None:
        """Add ``[B, D]`` vectors (kept on their device, in ``storage_dtype``)."""
        if x.ndim != 2:
            raise InputError(f"KNN bank vectors must be [N, D], got {tuple(x.shape)}")
        self._parts.append(self._prep(x, self.normalize).to(self.storage_dtype))
        self.bank = None
        self._index = None

    def build(self) -> None:
        """Concatenate the added vectors and build the search index."""
        if self.bank is None:
            if not self._parts:
                raise InputError("the KNN bank is empty; add ID features before building.")
            self.bank = torch.cat(self._parts)
            self._parts = [self.bank]
        self._index = None
        faiss = _faiss()
        if self.bank.device.type != "cpu" or faiss is None:
            return
        d = self.bank.shape[1]
        data = self.bank.float().contiguous().numpy()
        if self.index_kind == "flat":
            idx = faiss.IndexFlatL2(d)
        else:
            n = data.shape[0]
            nlist = self.nlist or max(1, int(4 * math.sqrt(n)))
            quant = faiss.IndexFlatL2(d)
            idx = faiss.IndexIVFFlat(quant, d, min(nlist, n))
            g = torch.Generator().manual_seed(0)
            sample = data[torch.randperm(n, generator=g)[: min(n, 256 * nlist)].numpy()]
            idx.train(sample)
            idx.nprobe = self.nprobe
        idx.add(data)
        self._index = idx

    def __len__(self) -> int:
        return 0 if self.bank is None else int(self.bank.shape[0])

    def set_bank(self, bank: torch.Tensor) -> None:
        """Replace the bank (already normalised) and rebuild; used when loading saved state."""
        self._parts = [bank.to(self.storage_dtype)]
        self.bank = None
        self.build()

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances ``[B, k]`` (ascending, Euclidean) and indices of the ``k`` nearest vectors."""
        if self.bank is None:
            self.build()
        assert self.bank is not None
        n = self.bank.shape[0]
        if k > n:
            raise InputError(
                f"k={k} nearest neighbours requested but the bank holds only {n} vectors; lower k or fit on more data."
            )
        q = self._prep(q, self.normalize)
        # faiss is invisible to a trace (trace/compile/export): the exact torch search then
        if self._index is not None and q.device.type == "cpu" and not tracing():
            d2, idx = self._index.search(q.contiguous().numpy(), k)
            d2 = torch.from_numpy(d2).clamp_min(0)
            return d2.sqrt(), torch.from_numpy(idx)
        return self._torch_search(q.to(self.bank.device), k)

    def _torch_search(self, q: torch.Tensor, k: int, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        qn = (q * q).sum(1, keepdim=True)
        best_d = best_i = None
        for s in range(0, self.bank.shape[0], chunk):
            b = self.bank[s : s + chunk].float()
            d2 = qn - 2 * q @ b.T + (b * b).sum(1)[None]
            kk = min(k, b.shape[0])
            d, i = torch.topk(d2, kk, dim=1, largest=False)
            i = i + s
            if best_d is None:
                best_d, best_i = d, i
            else:
                cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                best_d, j = torch.topk(cat_d, k, dim=1, largest=False)
                best_i = torch.gather(cat_i, 1, j)
        return best_d.clamp_min(0).sqrt(), best_i

    def kth_distance(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """Distance ``[B]`` from each query to its ``k``-th nearest bank vector."""
        d, _ = self.search(q, k)
        return d[:, k - 1].to(q.device)
