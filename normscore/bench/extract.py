"""Feature extraction for a benchmark run: each split's features come from the
:class:`~normscore.bench.cache.FeatureCache` (captured once, the union of what the detectors
need, so adding detectors later only captures the missing keys); what was captured or read is
recorded per split for ``results.json``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..adapters import Adapter
from ..data import ImageSet
from ..taps import Features
from .cache import FeatureCache
from .config import BenchConfig, SplitRef
from .models import LoadedModel

__all__ = ["Extractor"]


class Extractor:
    """Features of the run's splits (``sets``/``refs`` by split name) through ``fcache``."""

    def __init__(
        self,
        cfg: BenchConfig,
        fcache: FeatureCache,
        adapter: Adapter,
        lm: LoadedModel,
        sets: dict[str, ImageSet],
        refs: dict[str, SplitRef],
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.fcache, self.adapter, self.lm = cfg, fcache, adapter, lm
        self.sets, self.refs, self.log = sets, refs, log
        self.split_info: dict[str, dict[str, Any]] = {}

    def split_key(self, key: str) -> dict[str, Any]:
        """The cache key of split ``key`` (its data, rows and input format)."""
        r = self.refs[key]
        ds = self.sets[key]
        return FeatureCache.split_key(
            ds, name=r.dataset, split=r.split, data_root=self.cfg.data_root, fmt=self.lm.format.describe()
        )

    def features(self, key: str, keys: set[str]) -> Features:
        """Features ``keys`` (and the labels) of split ``key``, captured if not cached."""
        ds = self.sets[key]
        feats, st = self.fcache.features(
            adapter=self.adapter,
            dataset=ds,
            model_key=self.lm.weights_sha256,
            split_key=self.split_key(key),
            keys=set(keys),
            batch_size=self.cfg.batch_size,
            workers=self.cfg.workers,
            progress=self.cfg.progress,
            desc=f"features {self.refs[key].label}",
        )
        rec = self.split_info.setdefault(
            key,
            {
                "dataset": self.refs[key].dataset,
                "split": self.refs[key].split,
                "group": self.refs[key].group,
                "size": len(ds),
                "rows_extracted": 0,
                "model_batches": 0,
                "resumed_rows": 0,
                "seconds": 0.0,
                "keys": [],
            },
        )
        rec["rows_extracted"] += st.rows
        rec["model_batches"] += st.batches
        rec["resumed_rows"] += st.resumed_rows
        rec["seconds"] += st.seconds
        rec["keys"] = sorted(set(rec["keys"]) | set(keys))
        rec["cache"] = "extracted" if rec["rows_extracted"] else "cached"
        if st.rows:
            what = "resumed" if st.resumed_rows else "captured"
            self.log(
                f"features {self.refs[key].label}: {what} {len(keys) - st.cached_keys} key(s) for {st.rows} images in {st.seconds:.1f} s"
            )
        feats["labels"] = ds.labels.clone()
        return feats
