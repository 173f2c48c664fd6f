"""Cached detectors (``feature_only``, no gradients): fitted with ``fit_features`` on the fit
split's stored features and scored with ``score_features``, chunk by chunk."""

from __future__ import annotations

import numpy as np
import torch

from ..adapters import Adapter
from ..detectors.base import Detector
from ..taps import Features
from .cache import spec_keys

__all__ = ["FEATURE_CHUNK", "fit_cached", "score_cached"]

FEATURE_CHUNK = 4096


def _chunks(feats: Features, n: int, size: int = FEATURE_CHUNK) -> list[Features]:
    return [feats.select(slice(i, i + size)) for i in range(0, n, size)] if n else []


def fit_cached(det: Detector, fit_feats: Features, n: int, adapter: Adapter, device: torch.device) -> Detector:
    """Fit ``det`` on the first ``n`` rows of ``fit_feats`` (all of them: ``calibration=0``)."""
    if det.needs_fit:
        keys = spec_keys(det.capture_spec(adapter, "fit"), adapter)
        sub = fit_feats.subset([*keys, "labels"])
        chunks = _chunks(sub, n)
        det.fit_features((c.to(device) for c in chunks) if device.type != "cpu" else chunks, calibration=0.0)
    return det


def score_cached(det: Detector, feats: Features, adapter: Adapter, device: torch.device) -> np.ndarray:
    """Scores of a fitted ``det`` on stored features (float64)."""
    keys = spec_keys(det.capture_spec(adapter, "score"), adapter)
    missing = keys - set(feats)
    if missing:
        raise RuntimeError(f"features {sorted(missing)} were not captured")
    sub = feats.subset(keys)
    n = next(iter(feats.values())).shape[0]
    outs = [
        det.score_features(c.to(device) if device.type != "cpu" else c).detach().float().cpu() for c in _chunks(sub, n)
    ]
    return torch.cat(outs).numpy().astype(np.float64) if outs else np.zeros(0)
