"""On-disk feature cache: one model pass per split, reused by every detector and every run.

A split's features live under ``ROOT/features/<model>/<split>/``:

* ``<model>`` - the first 24 hex digits of the SHA-256 of the model weights;
* ``<split>`` - a hash of the data set, split, rows (a fingerprint of the images and labels),
  the input format (channels, size, crop, interpolation, normalisation), the normscore
  version and this cache's format version (``split.json`` holds the readable key);
* inside, one folder per **capture group**: the feature keys captured together in one pass
  (``"logits"``, ``"penultimate"``, ``"block:<name>:<reduction>"``, ``"<view>|<key>"``; a
  group's id hashes the keys and the source code of any input view it used). A group is
  written in parts of ``part_rows`` rows, each saved atomically (``part-00000.pt``, written to
  a temporary file and renamed) and marked complete by ``done.json``.

A later run loads every requested key from complete groups and captures only the **missing**
keys, in a new group (one pass). An interrupted extraction resumes at its first missing part.
Files hold only tensors (``torch.save`` of a dict of tensors; read with
``torch.load(weights_only=True)``).

Features with a backward pass (gradients) are never cached: detectors that need them are
run live with the model (see :mod:`normscore.bench.runner`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .. import __version__
from ..adapters import Adapter
from ..files import atomic_write
from ..progress import progress_bar
from ..taps import (
    ALL_BLOCKS,
    STAGE_ENDS,
    CaptureSpec,
    Features,
    block_key,
    capture,
    expand_blocks,
    get_view,
    parse_key,
    view_key,
)

__all__ = ["CACHE_FORMAT", "ExtractStats", "FeatureCache", "spec_for_keys", "spec_keys"]

CACHE_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# capture specs <-> feature keys


def _base_keys(spec: CaptureSpec, adapter: Adapter | None) -> set[str]:
    keys: set[str] = set()
    if spec.logits:
        keys.add("logits")
    if spec.penultimate:
        keys.add("penultimate")
    if any(n in (ALL_BLOCKS, STAGE_ENDS) for n, _ in spec.blocks) and adapter is None:
        raise ValueError("a spec asking for every block or every stage needs the (resolved) adapter")
    keys |= {block_key(n, r) for n, r in (expand_blocks(adapter, spec.blocks) if adapter is not None else spec.blocks)}
    if spec.input:
        keys.add("input")
    return keys


def spec_keys(spec: CaptureSpec | None, adapter: Adapter | None = None) -> set[str]:
    """The feature keys a (backward-free) capture with ``spec`` produces (``adapter``
    expands the every-block wildcard)."""
    if spec is None:
        return set()
    if spec.backward is not None:
        raise ValueError("specs with a backward pass are not cacheable")
    base = _base_keys(spec, adapter)
    return base | {view_key(v, k) for v in spec.views for k in base}


def spec_for_keys(keys: Iterable[str]) -> CaptureSpec:
    """The smallest spec producing ``keys`` (view keys bring their base key along)."""
    base: set[str] = set()
    views: set[str] = set()
    blocks = set()
    for k in keys:
        key = parse_key(k)
        if key.view is not None:
            views.add(key.view)
        base.add(key.base)
        if key.block is not None:
            blocks.add((key.block, key.reduction))
        elif key.base not in ("logits", "penultimate", "input"):
            raise ValueError(f"feature key {key.base!r} cannot be captured from a spec")
    return CaptureSpec(
        logits="logits" in base,
        penultimate="penultimate" in base,
        blocks=frozenset(blocks),
        input="input" in base,
        views=frozenset(views),
    )


def _view_versions(keys: Iterable[str]) -> dict[str, str]:
    out = {}
    for v in sorted({view for k in keys if (view := parse_key(k).view) is not None}):
        fn = get_view(v)
        try:
            src = inspect.getsource(fn) if fn is not None else "missing"
        except (OSError, TypeError):
            src = repr(fn)
        out[v] = hashlib.sha256(src.encode()).hexdigest()[:12]
    return out


def _hash(obj: Any, n: int = 24) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _atomic_json(path: str, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def _atomic_torch(path: str, obj: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------


@dataclass
class ExtractStats:
    """What :meth:`FeatureCache.features` did for one split."""

    rows: int = 0  # rows pushed through the model
    batches: int = 0  # model passes (capture calls)
    seconds: float = 0.0
    cached_keys: int = 0
    extracted_keys: int = 0
    resumed_rows: int = 0  # rows of an interrupted extraction found on disk

    @property
    def status(self) -> str:
        if self.rows == 0:
            return "cached"
        return "resumed" if self.resumed_rows else "extracted"


class FeatureCache:
    """Feature cache rooted at ``root`` (``None``: keep nothing on disk, extract every time)."""

    def __init__(self, root: str | None, *, part_rows: int = 4096) -> None:
        self.root = root
        self.part_rows = int(part_rows)

    # ------------------------------------------------------------------ keys and folders
    @staticmethod
    def split_key(dataset: Any, *, name: str, split: str, data_root: str | None, fmt: dict[str, Any]) -> dict:
        """The readable key of one split of ``dataset`` (an :class:`~normscore.data.ImageSet`)."""
        return {
            "dataset": name,
            "split": split,
            "data_root": os.path.abspath(data_root) if data_root else None,
            "rows": len(dataset),
            "fingerprint": dataset.fingerprint(),
            "format": fmt,
            "normscore": __version__,
            "cache_format": CACHE_FORMAT,
        }

    def split_dir(self, model_key: str, split_key: dict) -> str | None:
        if self.root is None:
            return None
        return os.path.join(self.root, "features", model_key[:24], _hash(split_key))

    def _groups(self, sdir: str) -> list[tuple[str, dict]]:
        out = []
        if not os.path.isdir(sdir):
            return out
        for g in sorted(os.listdir(sdir)):
            done = os.path.join(sdir, g, "done.json")
            if os.path.isfile(done):
                try:
                    with open(done, encoding="utf-8") as f:
                        meta = json.load(f)
                except (OSError, ValueError):
                    continue
                if meta.get("views", {}) == _view_versions(meta.get("keys", [])):
                    out.append((g, meta))
        return out

    def cached_keys(self, model_key: str, split_key: dict) -> set[str]:
        """Feature keys of this split already complete on disk."""
        sdir = self.split_dir(model_key, split_key)
        if sdir is None:
            return set()
        return {k for _, m in self._groups(sdir) for k in m["keys"]}

    # ------------------------------------------------------------------ the main entry
    def features(
        self,
        *,
        adapter: Adapter,
        dataset: torch.utils.data.Dataset,
        model_key: str,
        split_key: dict,
        keys: set[str],
        batch_size: int = 256,
        workers: int = 0,
        progress: bool | None = None,
        desc: str = "extract",
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[Features, ExtractStats]:
        """All ``keys`` for every row of ``dataset`` (in order), from the cache or one model pass
        over the rows for the missing keys (resuming an interrupted pass)."""
        t0 = time.perf_counter()
        stats = ExtractStats()
        n = len(dataset)
        sdir = self.split_dir(model_key, split_key)
        have: dict[str, str] = {}
        if sdir is not None:
            os.makedirs(sdir, exist_ok=True)
            split_json = os.path.join(sdir, "split.json")
            if not os.path.exists(split_json):
                _atomic_json(split_json, {"model": model_key, **split_key})
            for g, meta in self._groups(sdir):
                for k in meta["keys"]:
                    have.setdefault(k, g)
        missing = set(keys) - set(have)
        stats.cached_keys = len(set(keys) - missing)
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            spec = spec_for_keys(missing)
            produced = sorted(spec_keys(spec, adapter))
            stats.extracted_keys = len(produced)
            views = _view_versions(produced)
            gid = _hash({"keys": produced, "views": views}, 16)
            gdir = os.path.join(sdir, gid) if sdir is not None else None
            fresh = self._extract(
                adapter, dataset, spec, produced, views, gdir, batch_size, workers, progress, desc, stats, on_batch
            )
            if gdir is not None:
                for k in produced:
                    have.setdefault(k, gid)
        out = Features()
        by_group: dict[str, list[str]] = {}
        for k in sorted(keys):
            if k in fresh:
                out[k] = fresh[k]
            else:
                by_group.setdefault(have[k], []).append(k)
        for g, ks in by_group.items():
            assert sdir is not None
            out.update(self._load_group(os.path.join(sdir, g), ks, n))
        stats.seconds = time.perf_counter() - t0
        return out, stats

    # ------------------------------------------------------------------ internals
    def _load_group(self, gdir: str, keys: list[str], n: int) -> dict[str, torch.Tensor]:
        with open(os.path.join(gdir, "done.json"), encoding="utf-8") as f:
            meta = json.load(f)
        parts = [torch.load(os.path.join(gdir, p), map_location="cpu", weights_only=True) for p in meta["parts"]]
        out = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in keys}
        for k, v in out.items():
            if v.shape[0] != n:
                raise RuntimeError(f"feature cache {gdir}: {k} has {v.shape[0]} rows, expected {n}")
        return out

    def _extract(
        self,
        adapter: Adapter,
        dataset: Any,
        spec: CaptureSpec,
        produced: list[str],
        views: dict[str, str],
        gdir: str | None,
        batch_size: int,
        workers: int,
        progress: bool | None,
        desc: str,
        stats: ExtractStats,
        on_batch: Callable[[int], None] | None,
    ) -> dict[str, torch.Tensor]:
        n = len(dataset)
        p_rows = max(self.part_rows, 1)
        n_parts = max(1, -(-n // p_rows))
        part_names = [f"part-{i:05d}.pt" for i in range(n_parts)]
        meta = {"keys": produced, "views": views, "rows": n, "part_rows": p_rows, "parts": part_names}
        done_parts: dict[int, dict[str, torch.Tensor]] = {}
        start_part = 0
        if gdir is not None:
            gmeta = os.path.join(gdir, "group.json")
            if os.path.isdir(gdir):
                try:
                    with open(gmeta, encoding="utf-8") as f:
                        old = json.load(f)
                except (OSError, ValueError):
                    old = None
                if old != meta:
                    shutil.rmtree(gdir, ignore_errors=True)
            os.makedirs(gdir, exist_ok=True)
            _atomic_json(gmeta, meta)
            while start_part < n_parts and os.path.isfile(os.path.join(gdir, part_names[start_part])):
                start_part += 1
            stats.resumed_rows = min(start_part * p_rows, n)
        start = start_part * p_rows
        buf: dict[str, list[torch.Tensor]] = {k: [] for k in produced}
        buf_rows = 0
        part = start_part
        if start < n:
            rows = list(range(start, n))
            sub = torch.utils.data.Subset(dataset, rows)
            loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=workers)
            bar = progress_bar(total=n - start, desc=desc, enabled=progress, unit="img")
            pos = start
            try:
                for batch in loader:
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    b = x.shape[0]
                    feats = capture(adapter, x, spec, index=torch.arange(pos, pos + b))
                    stats.batches += 1
                    if on_batch is not None:
                        on_batch(b)
                    for k in produced:
                        buf[k].append(feats[k].detach().cpu())
                    buf_rows += b
                    pos += b
                    stats.rows += b
                    bar.update(b)
                    while buf_rows >= p_rows or (pos == n and buf_rows > 0):
                        take = min(p_rows, buf_rows)
                        chunk = {k: torch.cat(v) for k, v in buf.items()}
                        head = {k: v[:take].clone() for k, v in chunk.items()}
                        buf = {k: [v[take:]] for k, v in chunk.items()}
                        buf_rows -= take
                        if gdir is not None:
                            _atomic_torch(os.path.join(gdir, part_names[part]), head)
                        else:
                            done_parts[part] = head
                        part += 1
            finally:
                bar.close()
        if gdir is not None:
            _atomic_json(os.path.join(gdir, "done.json"), meta)
            return self._load_group(gdir, produced, n)
        return {k: torch.cat([done_parts[i][k] for i in sorted(done_parts)]) for k in produced}
