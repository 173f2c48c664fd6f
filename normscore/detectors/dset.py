"""Extract once, score many: fit and score a list of detectors from shared model passes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..errors import ConfigError
from ..io import write_state
from ..stream import FitStream
from ..taps import CaptureSpec, Features, capture
from .base import Detector
from .fitting import fit_detectors
from .registry import create

__all__ = ["DetectorSet"]


class DetectorSet:
    """Several detectors fitted and scored from **one** model pass per batch.

    ``fit`` captures the union of what the detectors need once per batch (detectors with
    several fit passes, such as gradient subspaces, add their own passes); ``score(x)`` runs
    one forward pass (plus one batched backward pass per distinct gradient objective) and
    returns ``{name: scores [B]}``. Scores equal those of each detector used alone.

    >>> ds = normscore.DetectorSet(["msp", "energy", normscore.create("knn", k=10)])
    >>> scores = ds.fit(model, id_loader).score(x)   # {"msp": ..., "energy": ..., "knn": ...}
    """

    def __init__(self, detectors: Sequence[Detector | str]) -> None:
        if isinstance(detectors, (str, Detector)):
            detectors = [detectors]
        dets: list[Detector] = []
        for d in detectors:
            if isinstance(d, str):
                d = create(d)
            elif not isinstance(d, Detector):
                raise ConfigError(f"DetectorSet takes detector names or Detector objects, got {type(d).__name__}.")
            dets.append(d)
        if not dets:
            raise ConfigError("DetectorSet needs at least one detector.")
        names = [d.name for d in dets]
        keys = self._keys(names)
        self.detectors: dict[str, Detector] = dict(zip(keys, dets))
        self._model: nn.Module | None = None
        self._adapter: Adapter | None = None

    @staticmethod
    def _keys(names: list[str]) -> list[str]:
        out, seen = [], {}
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
        return out

    def __len__(self) -> int:
        return len(self.detectors)

    def __getitem__(self, key: str) -> Detector:
        return self.detectors[key]

    def __iter__(self):
        return iter(self.detectors)

    def __repr__(self) -> str:
        return f"DetectorSet({list(self.detectors)})"

    # ------------------------------------------------------------------
    def attach(
        self, model: nn.Module, adapter: Adapter | None = None, *, strict: bool = True, tag: str | None = None
    ) -> DetectorSet:
        """Bind every detector to ``model``; fitted ones first check it is the model they were
        fitted on (see :meth:`Detector.attach`; nothing is bound when one check fails)."""
        adapter = Detector._resolve_adapter(model, adapter)
        for d in self.detectors.values():
            d._verify_model(adapter, d.fingerprint, fitted=d.is_fitted, strict=strict, tag=tag)
        return self._bind(model, adapter)

    def _bind(self, model: nn.Module, adapter: Adapter | None = None) -> DetectorSet:
        adapter = adapter if adapter is not None else get_adapter(model)
        for d in self.detectors.values():
            d._bind(model, adapter)
        self._model, self._adapter = model, adapter
        return self

    def fit(
        self,
        model: nn.Module,
        loader: Iterable,
        *,
        adapter: Adapter | None = None,
        calibration: float = 0.1,
        tpr: float = 0.95,
        max_samples: int | None = None,
        progress: bool | None = None,
        tag: str | None = None,
    ) -> DetectorSet:
        """Fit every detector from shared passes (same arguments as :meth:`Detector.fit`)."""
        if not 0.0 < tpr <= 1.0:
            raise ConfigError(f"tpr must be in (0, 1], got {tpr}.")
        self._bind(model, adapter)
        assert self._adapter is not None
        stream = FitStream(
            self._adapter, loader, calibration=calibration, max_samples=max_samples, progress=progress, desc="fit set"
        )
        fit_detectors(list(self.detectors.values()), stream, tpr=tpr, tag=tag)
        return self

    def fit_features(
        self,
        features: Features | Iterable[Features],
        *,
        calibration: float = 0.1,
        tpr: float = 0.95,
        tag: str | None = None,
    ) -> DetectorSet:
        """Fit every detector on cached features (see :meth:`Detector.fit_features`)."""
        if self._adapter is None:
            raise ConfigError("attach(model) the set before fit_features.")
        batches = [features] if isinstance(features, Features) else features
        fit_detectors(
            list(self.detectors.values()), None, tpr=tpr, feature_batches=batches, calibration=calibration, tag=tag
        )
        return self

    def _groups(self) -> list[tuple[CaptureSpec, list[str]]]:
        """Partition detectors into capture passes: one per distinct backward objective."""
        assert self._adapter is not None
        groups: list[tuple[CaptureSpec, list[str]]] = []
        for key, d in self.detectors.items():
            d._check_fitted()
            spec = d.capture_spec(self._adapter, "score")
            for i, (g, members) in enumerate(groups):
                if spec.backward is None or g.backward is None or g.backward is spec.backward:
                    groups[i] = (g | spec, [*members, key])
                    break
            else:
                groups.append((spec, [key]))
        return groups

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: scores [B]}`` from one forward pass (higher = more ID)."""
        if self._adapter is None:
            raise ConfigError("DetectorSet is not attached to a model; call fit(model, loader) or attach(model).")
        out: dict[str, torch.Tensor] = {}
        for spec, members in self._groups():
            feats = capture(self._adapter, x, spec)
            for k in members:
                out[k] = self.detectors[k].score_features(feats)
        return {k: out[k] for k in self.detectors}

    def score_features(self, feats: Features) -> dict[str, torch.Tensor]:
        return {k: d.score_features(feats) for k, d in self.detectors.items()}

    def capture_spec(self, stage: str = "score") -> CaptureSpec:
        assert self._adapter is not None
        spec: CaptureSpec | None = None
        for d in self.detectors.values():
            s = d.capture_spec(self._adapter, stage)
            if s is not None:
                spec = s if spec is None else spec | s
        assert spec is not None
        return spec

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = self.score(x)
        return {k: scores[k] < self.detectors[k].decision.threshold for k in scores}

    # ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"keys": list(self.detectors), "detectors": [d.state_dict() for d in self.detectors.values()]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DetectorSet:
        dets = []
        for s in state["detectors"]:
            d = create(s["detector"])
            d.load_state_dict(s)
            dets.append(d)
        ds = cls(dets)
        ds.detectors = dict(zip(state["keys"], dets))
        return ds

    def save(self, path: str) -> None:
        unfitted = [
            d.name for d in self.detectors.values() if isinstance(d, Detector) and d.needs_fit and not d.is_fitted
        ]
        write_state(path, type(self).__name__, self.state_dict, unfitted)
