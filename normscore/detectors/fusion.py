"""Score fusion: several detectors calibrated on held-out ID data and averaged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import Adapter
from ..errors import ConfigError
from ..stream import FitStream
from ..taps import CaptureSpec, Features
from . import sync
from .base import Detector
from .constraints import Constraint, Interval, OneOf
from .fitting import fit_detectors
from .registry import create, register


class _Members(Constraint):
    def check(self, name: str, value: Any) -> None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) < 1:
            raise ConfigError(f"{name} must be a non-empty list of detector names or {{'name': ..., **hp}} dicts.")
        for m in value:
            if isinstance(m, str):
                create(m)
            elif isinstance(m, Mapping) and isinstance(m.get("name"), str):
                if m["name"] == "fusion":
                    raise ConfigError("fusion members cannot be fusion detectors.")
                create(m["name"], **{k: v for k, v in m.items() if k != "name"})
            else:
                raise ConfigError(f"invalid fusion member {m!r}; use a name or {{'name': ..., **hp}}.")


@register
class Fusion(Detector):
    """Average of member scores, each normalised on held-out ID data.

    ``method="ecdf"``: each member score ``s_m`` becomes its empirical CDF value
    ``F_m(s_m)`` = share of held-out ID scores below it (ties counted half), so every member
    lives on the same [0, 1] scale; ``method="zscore"``: ``(s_m - mean_m) / std_m``. The fused
    score is the mean over members (higher = more ID). Members are fitted from shared passes
    (``DetectorSet`` machinery) and their references come from the same calibration hold-out
    as the threshold (``fit(..., calibration > 0)`` is required). ``reference_size`` caps the
    stored reference distribution (evenly spaced quantiles).

    Rank/score-normalised fusion as in e.g. OpenOOD's and oodeel's aggregators; see Haroush et
    al., "A Statistical Framework for Efficient Out of Distribution Detection in Deep Neural
    Networks", ICLR 2022, arXiv:2102.12967 for p-value (ECDF) combination.
    """

    name = "fusion"
    paper = "Haroush et al., ICLR 2022, arXiv:2102.12967 (ECDF/p-value combination)"
    formula = "mean_m F_m(s_m), F_m = held-out ID ECDF of member m (or z-score)"
    needs_fit = True
    fit_mode = "multi_pass"  # the members' shared pass, then the held-out references
    constraints = {
        "members": _Members(),
        "method": OneOf(("ecdf", "zscore")),
        "reference_size": Interval(16, 1_000_000, integer=True),
    }
    search_space = {"method": ["ecdf", "zscore"]}

    def __init__(
        self,
        members: Sequence[str | Mapping[str, Any]] = ("msp", "energy", "penultimate_norm"),
        method: str = "ecdf",
        reference_size: int = 4096,
    ) -> None:
        super().__init__()
        self.members = [dict(m) if isinstance(m, Mapping) else m for m in members]
        self.method = method
        self.reference_size = reference_size
        self._dets: list[Detector] | None = None
        self._member_dets()

    # ------------------------------------------------------------------ members
    def _member_dets(self) -> list[Detector]:
        if self._dets is None:
            dets = []
            for m in self.members:
                if isinstance(m, str):
                    dets.append(create(m))
                else:
                    dets.append(create(m["name"], **{k: v for k, v in m.items() if k != "name"}))
            self._dets = dets
            self.needs_labels = any(d.needs_labels for d in dets)
            self.needs_gradients = any(d.needs_gradients for d in dets)
            self.feature_only = all(d.feature_only for d in dets)
            self.shape_bound = frozenset().union(*(d.shape_bound for d in dets))
            if self._model is not None:
                for d in dets:
                    d._bind(self._model, self._adapter)
        return self._dets

    def set_params(self, **params: Any) -> Fusion:
        super().set_params(**params)
        if "members" in params:
            self._dets = None
        return self

    def _bind(self, model: nn.Module, adapter: Adapter | None = None) -> Fusion:
        super()._bind(model, adapter)
        for d in self._member_dets():
            d._bind(model, self._adapter)
        return self

    def to(self, device: torch.device | str) -> Fusion:
        super().to(device)
        if self._dets is not None:
            for d in self._dets:
                d.to(device)
        return self

    # ------------------------------------------------------------------ capture / fit
    def capture_spec(self, adapter: Adapter, stage: str) -> CaptureSpec | None:
        if stage == "calibrate":
            # the members' score specs are known only after they are fitted (featurenorm, ldg);
            # _fit returns the held-out features it captured with them, to calibrate on
            return CaptureSpec(logits=True)
        spec: CaptureSpec | None = None
        for d in self._member_dets():
            s = d.capture_spec(adapter, "score")
            spec = s if spec is None else spec | s
        return spec

    def _check_labels(self, feats: Features) -> None:  # members check their own labels
        pass

    def _fit(self, stream: FitStream) -> Features:
        if stream.stride == 0:
            raise ConfigError("fusion normalises members on held-out ID data: fit with calibration > 0.")
        dets = self._member_dets()
        for d in dets:
            d._bind(stream.adapter.model, stream.adapter)
        fit_detectors(dets, stream)
        spec = self.capture_spec(stream.adapter, "score")
        held = Features.cat(list(stream.features(spec, split="calibration")))
        if held.batch_size:
            local = torch.stack([d.score_features(held).double().cpu() for d in dets]).T  # [n, M]
            pos = held["index"].cpu()
        else:  # a rank may hold no held-out sample (e.g. every 10th sample lands on another rank)
            local, pos = torch.zeros(0, len(dets), dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        (scores,) = sync.gather_in_order(pos, local)  # every rank's held-out scores, in sample order
        scores = scores.T.contiguous()  # [M, N]
        if scores.shape[1] == 0:
            raise ConfigError("no held-out calibration samples; use more fit data or a larger calibration share.")
        if self.method == "ecdf":
            q = torch.linspace(0, 1, min(self.reference_size, scores.shape[1]), dtype=torch.float64)
            self.reference_ = torch.quantile(scores, q, dim=1).T.contiguous().float()  # [M, R]
        else:
            self.mean_ = scores.mean(1).float()
            self.std_ = scores.std(1).clamp_min(1e-12).float()
        self.n_reference_ = int(scores.shape[1])
        return held  # the threshold is calibrated on these features (fit_detectors)

    def score_features(self, feats: Features) -> torch.Tensor:
        dets = self._member_dets()
        out = []
        for i, d in enumerate(dets):
            s = d.score_features(feats).float()
            if self.method == "ecdf":
                ref = self.reference_[i].to(s.device)
                lo = torch.searchsorted(ref, s, right=False)
                hi = torch.searchsorted(ref, s, right=True)
                out.append((lo + hi).float() / (2.0 * ref.numel()))
            else:
                out.append((s - self.mean_[i].to(s.device)) / self.std_[i].to(s.device))
        return torch.stack(out).mean(0)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["fitted"]["members_state_"] = [d.state_dict() for d in self._member_dets()] if self.is_fitted else []
        return sd

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        state = dict(state)
        fitted = dict(state.get("fitted", {}))
        members_state = fitted.pop("members_state_", [])
        state["fitted"] = fitted
        super().load_state_dict(state, strict=strict)
        self._dets = None
        model, self._model = self._model, None  # members load unbound: the fusion's fingerprint was checked
        try:
            for d, s in zip(self._member_dets(), members_state):
                d.load_state_dict(s)
        finally:
            self._model = model
        if model is not None:
            for d in self._member_dets():
                d._bind(model, self._adapter)
