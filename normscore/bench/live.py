"""Live detectors (``feature_only=False``, e.g. ODIN's input perturbation or LDG's gradients,
or several fit passes): fitted with ``fit(model, loader)`` on the live-fit split and scored with
``score(x)`` batch by batch - their own model passes; their scores are cached per split."""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..adapters import Adapter
from ..data import ImageSet
from ..detectors.registry import create, detector_class
from ..errors import CalibrationWarning
from ..files import atomic_write
from ..progress import progress_bar
from .config import BenchConfig, SplitRef
from .models import LoadedModel
from .plan import DetectorRun
from .search import best_by_val_auroc

__all__ = ["LiveScorer"]


class LiveScorer:
    """Scores of live detectors on the run's splits, read from or written to ``cache_root``."""

    def __init__(
        self,
        cfg: BenchConfig,
        lm: LoadedModel,
        adapter: Adapter,
        sets: dict[str, ImageSet],
        refs: dict[str, SplitRef],
        split_key: Callable[[str], dict[str, Any]],
        cache_root: str | None,
    ) -> None:
        self.cfg, self.lm, self.adapter = cfg, lm, adapter
        self.sets, self.refs, self.split_key, self.cache_root = sets, refs, split_key, cache_root

    def _loader(self, key: str) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.sets[key], batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.workers
        )

    def _scores_path(self, name: str, params: dict[str, Any], key: str) -> str | None:
        if self.cache_root is None:
            return None
        det_key = {"detector": name, "params": params, "version": __version__}
        fit = self.split_key("live-fit") if detector_class(name).needs_fit else None
        h = hashlib.sha256(
            json.dumps({"det": det_key, "fit": fit, "split": self.split_key(key)}, sort_keys=True, default=str).encode()
        ).hexdigest()[:24]
        d = os.path.join(self.cache_root, "scores", self.lm.weights_sha256[:24])
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f"{name}-{h}.pt")

    def scores(
        self, name: str, params: dict[str, Any], keys: list[str], state: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """Scores of a live detector on ``keys`` splits (cached per split; fits only if needed)."""
        out: dict[str, np.ndarray] = {}
        todo = []
        for k in keys:
            p = self._scores_path(name, params, k)
            if p and os.path.isfile(p):
                out[k] = torch.load(p, map_location="cpu", weights_only=True)["scores"].numpy().astype(np.float64)
                state["cached_splits"] = [*state.get("cached_splits", []), k]
            else:
                todo.append(k)
        if not todo:
            return out
        det = state.get("det")
        if det is None:
            det = create(name, **params).attach(self.lm.model, self.adapter)
            if det.needs_fit:
                t0 = time.perf_counter()
                # library default calibration (0.1): some multi-pass detectors need held-out ID;
                # the bench scores and never thresholds, so the held-out size is not warned about
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "the predict threshold was calibrated", CalibrationWarning)
                    det.fit(self.lm.model, self._loader("live-fit"), adapter=self.adapter, progress=self.cfg.progress)
                state["fit_seconds"] = state.get("fit_seconds", 0.0) + time.perf_counter() - t0
            state["det"] = det
        for k in todo:
            t0 = time.perf_counter()
            parts = []
            bar = progress_bar(
                total=len(self.sets[k]), desc=f"{name} {self.refs[k].label}", enabled=self.cfg.progress, unit="img"
            )
            try:
                for x, _ in self._loader(k):
                    parts.append(det.score(x).detach().float().cpu())
                    bar.update(x.shape[0])
            finally:
                bar.close()
            s = torch.cat(parts)
            p = self._scores_path(name, params, k)
            if p:
                atomic_write(p, lambda f, s=s: torch.save({"scores": s}, f))
            out[k] = s.numpy().astype(np.float64)
            state["score_seconds"] = state.get("score_seconds", 0.0) + time.perf_counter() - t0
        return out

    def run(self, r: DetectorRun, configs: list[dict[str, Any]], splits: list[str]) -> None:
        """Search (with several ``configs``), fit and score live detector ``r`` on ``splits``."""
        best_c = configs[0]
        t0 = time.perf_counter()
        if len(configs) > 1:
            sbar = progress_bar(total=len(configs), desc=f"search {r.name}", enabled=self.cfg.progress, unit="cfg")

            def val_scores(c: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, None]:
                v = self.scores(r.name, c, ["val-id", "val-ood"], {})
                sbar.update(1)
                return v["val-id"], v["val-ood"], None

            best = best_by_val_auroc(configs, val_scores, r.search)
            sbar.close()
            if best is not None:  # no finite validation AUROC: the first configuration
                best_c = configs[best[0]]
        r.seconds["search"] = time.perf_counter() - t0
        state: dict[str, Any] = {}
        r.scores = self.scores(r.name, best_c, splits, state)
        r.seconds["fit"] = state.get("fit_seconds", 0.0)
        r.seconds["score"] = state.get("score_seconds", 0.0)
        r.info["live_scores_from_cache"] = state.get("cached_splits", [])
        r.params = (state.get("det") or create(r.name, **best_c).attach(self.lm.model, self.adapter)).get_params()
