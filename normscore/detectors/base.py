"""The detector base class, hyperparameter checks, decisions and the registry.

A detector is written as three small pieces:

* ``capture_spec(adapter, stage)`` - which features it needs (``stage`` is ``"fit"``,
  ``"score"`` or ``"calibrate"``);
* ``_fit_begin`` / ``_fit_update(features)`` / ``_fit_end`` - streamed statistics (or, for
  detectors with several passes, ``_fit(stream)``);
* ``score_features(features) -> [B]`` - the score, **higher = more in-distribution**.

``fit(model, loader)``, ``score(x)``, ``predict(x)``, ``state_dict()`` and ``save()`` are written
once here and drive the taps.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..errors import (
    CalibrationWarning,
    ConfigError,
    InputError,
    ModelMismatchError,
    NormscoreError,
    NotFittedError,
    did_you_mean,
)
from ..fingerprint import ModelFingerprint, mismatch_message
from ..io import write_state
from ..runmode import model_device, model_dtype
from ..runmode import tracing as _tracing
from ..stats import all_gather_cat, all_reduce_int, all_reduce_sum
from ..stream import FitStream
from ..taps import CaptureSpec, Features, capture, feature_kind, feature_shape, spec_keys
from ._zoo import LazyCache

__all__ = [
    "Decision",
    "Detector",
    "Interval",
    "OneOf",
    "create",
    "detector_class",
    "detector_info",
    "list_detectors",
    "register",
]

D = TypeVar("D", bound="Detector")


# ---------------------------------------------------------------------------------------------
# hyperparameter constraints


class Constraint:
    def check(self, name: str, value: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Constraint):
    """A real (or integer) in ``[low, high]`` with optional open ends."""

    low: float = -math.inf
    high: float = math.inf
    closed: str = "both"  # "both", "left", "right", "neither"
    integer: bool = False
    allow_none: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "an integer" if self.integer else "a number"
            raise ConfigError(f"hyperparameter {name}={value!r} must be {kind}.")
        if self.integer and not float(value).is_integer():
            raise ConfigError(f"hyperparameter {name}={value!r} must be an integer.")
        lo_ok = value >= self.low if self.closed in ("both", "left") else value > self.low
        hi_ok = value <= self.high if self.closed in ("both", "right") else value < self.high
        if math.isnan(float(value)) or not (lo_ok and hi_ok):
            lb = "[" if self.closed in ("both", "left") else "("
            rb = "]" if self.closed in ("both", "right") else ")"
            raise ConfigError(
                f"hyperparameter {name}={value!r} is out of range; it must be in {lb}{self.low}, {self.high}{rb}."
            )


@dataclass(frozen=True)
class OneOf(Constraint):
    values: tuple

    def check(self, name: str, value: Any) -> None:
        if value not in self.values:
            raise ConfigError(
                f"hyperparameter {name}={value!r} is not allowed; choose one of {list(self.values)}."
                + did_you_mean(str(value), [str(v) for v in self.values])
            )


# ---------------------------------------------------------------------------------------------
# decisions


#: confidence level of :attr:`Decision.tpr_interval`
TPR_CONFIDENCE = 0.95


def tpr_interval(k: int, n: int, confidence: float = TPR_CONFIDENCE) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a rate from ``k`` successes in ``n`` trials."""
    from scipy.special import betaincinv  # the beta distribution's quantile function

    a = (1.0 - confidence) / 2.0
    lo = float(betaincinv(k, n - k + 1, a)) if k > 0 else 0.0
    hi = float(betaincinv(k + 1, n - k, 1.0 - a)) if k < n else 1.0
    return lo, hi


def _tpr_floor(tpr: float) -> float:
    """The lowest acceptable lower bound of the achieved TPR: the ID rejection rate ``1 - tpr``
    may be at most doubled (at least 1 point of slack, for ``tpr`` near 1)."""
    return tpr - max(1.0 - tpr, 0.01)


@functools.lru_cache(maxsize=64)
def held_out_needed(tpr: float, confidence: float = TPR_CONFIDENCE, limit: int = 20_000) -> int:
    """Held-out size from which on the interval's lower end stays above the floor
    (``tpr - max(1 - tpr, 0.01)``) when ``ceil(tpr * n)`` samples are accepted."""
    from scipy.special import betaincinv

    n = np.arange(1, limit + 1)
    k = np.minimum(n, np.ceil(tpr * n - 1e-9))
    lo = np.where(k > 0, betaincinv(np.maximum(k, 1), n - k + 1, (1.0 - confidence) / 2.0), 0.0)
    bad = np.flatnonzero(lo < _tpr_floor(tpr))
    return int(n[bad[-1]] + 1) if bad.size else 1


@dataclass(frozen=True)
class Decision:
    """A calibrated OOD decision: ``score < threshold`` means OOD.

    ``threshold`` accepts (scores >=) at least ``tpr`` of the ``n`` held-out ID samples it was
    calibrated on; ``achieved_tpr`` is the exact share accepted there. ``tpr_low`` and
    ``tpr_high`` bound the share of *new* ID data the threshold accepts: the 95% Clopper-Pearson
    interval of ``achieved_tpr`` over ``n`` samples (wide for small ``n``; computed on load for
    files saved before it was stored).
    """

    threshold: float
    tpr: float
    n: int
    achieved_tpr: float
    tpr_low: float | None = None
    tpr_high: float | None = None

    def __post_init__(self) -> None:
        if (self.tpr_low is None or self.tpr_high is None) and self.n > 0:
            lo, hi = tpr_interval(round(self.achieved_tpr * self.n), self.n)
            object.__setattr__(self, "tpr_low", lo)
            object.__setattr__(self, "tpr_high", hi)

    @staticmethod
    def calibrate(id_scores: torch.Tensor, tpr: float = 0.95, *, warn: bool = True) -> Decision:
        """The threshold keeping ``tpr`` of ``id_scores``; warns (:class:`CalibrationWarning`)
        when the held-out set is too small for it: when the share of new ID data it rejects may
        be more than twice ``1 - tpr`` at 95% confidence (for ``tpr = 0.95``: fewer than about
        140 samples; :func:`held_out_needed`)."""
        if not 0.0 < tpr <= 1.0:
            raise ConfigError(f"tpr must be in (0, 1], got {tpr}.")
        s = id_scores.detach().double().flatten().cpu()
        if s.numel() == 0:
            raise InputError("no calibration scores; cannot calibrate a threshold.")
        if not bool(torch.isfinite(s).all()):
            raise InputError("calibration scores contain NaN/Inf; cannot calibrate a threshold.")
        srt, _ = torch.sort(s)
        n = srt.numel()
        k = math.floor((1.0 - tpr) * n + 1e-9)
        k = min(max(k, 0), n - 1)
        thr = float(srt[k])
        achieved = float((s >= thr).double().mean())
        d = Decision(threshold=thr, tpr=float(tpr), n=int(n), achieved_tpr=achieved)
        if warn and d.tpr_low is not None and d.tpr_low < _tpr_floor(tpr):
            warnings.warn(
                f"the predict threshold was calibrated on only {n} held-out ID samples: at 95% "
                f"confidence it accepts between {100 * d.tpr_low:.1f}% and {100 * (d.tpr_high or 1):.1f}% "
                f"of new ID data (target {100 * tpr:g}%). For a reliable threshold use at least "
                f"{held_out_needed(tpr)} held-out samples: fit on more data (calibration= sets the "
                "held-out share) or det.calibrate(held_out_id_loader). The interval is in "
                "det.decision.tpr_low / tpr_high.",
                CalibrationWarning,
                stacklevel=2,
            )
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# the base class


class _DetectorMeta(type):
    """Checks hyperparameters right after construction and turns bad keywords into ConfigError."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        sig = inspect.signature(cls.__init__)
        try:
            sig.bind(None, *args, **kwargs)
        except TypeError as e:
            params = [p for p in sig.parameters if p != "self"]
            unknown = [k for k in kwargs if k not in params]
            if unknown:
                hint = did_you_mean(unknown[0], params)
                raise ConfigError(
                    f"{cls.__name__} ({getattr(cls, 'name', '')}) has no hyperparameter "
                    f"{unknown[0]!r}.{hint} Valid: {params}."
                ) from None
            raise ConfigError(f"{cls.__name__}: {e}. Hyperparameters are keyword arguments: {params}.") from None
        obj = super().__call__(*args, **kwargs)
        obj._check_params()
        return obj


class Detector(metaclass=_DetectorMeta):
    """Base class of every OOD detector. Scores: float tensor ``[B]``, higher = more ID.

    Typical use::

        det = normscore.create("energy").fit(model, id_loader)
        s = det.score(x)          # [B], higher = more in-distribution
        is_ood = det.predict(x)   # [B] bool, threshold calibrated at 95% ID TPR

    Hyperparameters are constructor arguments; fitted state lives in attributes ending in
    ``_``. ``fit`` holds out every ``round(1/calibration)``-th sample of the fit loader to
    calibrate the ``predict`` threshold (detectors without statistics calibrate on all samples).
    """

    #: registry name (lower-case snake case)
    name: ClassVar[str] = ""
    #: paper reference: "Authors, Venue Year, arXiv id"
    paper: ClassVar[str] = ""
    #: one-line formula of the score
    formula: ClassVar[str] = ""
    #: the fit needs class labels from the loader
    needs_labels: ClassVar[bool] = False
    #: the fit keeps statistics per class (class means): head classes without fit samples get none
    per_class: ClassVar[bool] = False
    #: scoring needs a backward pass (input or parameter gradients)
    needs_gradients: ClassVar[bool] = False
    #: the detector has statistics to fit (else ``fit`` only calibrates the threshold)
    needs_fit: ClassVar[bool] = False
    #: score_features works on cached features without the model
    feature_only: ClassVar[bool] = True
    #: hyperparameter -> constraint
    constraints: ClassVar[dict[str, Constraint]] = {}
    #: hyperparameter -> values tried by the search
    search_space: ClassVar[dict[str, list]] = {}
    #: feature kinds ("logits", "penultimate", "blocks") whose per-sample shape the fitted
    #: state (or, for detectors without statistics, the live head) fixes: features of another
    #: shape are refused before ``score_features`` runs
    shape_bound: ClassVar[frozenset[str]] = frozenset({"logits", "penultimate", "blocks"})

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._adapter: Adapter | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every ``score_features`` a subclass defines checks the feature shapes first."""
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("score_features")
        if fn is None or getattr(fn, "_checks_shapes", False):
            return

        @functools.wraps(fn)
        def score_features(self: Detector, feats: Features) -> torch.Tensor:
            self._check_feature_shapes(feats)
            return fn(self, feats)

        score_features._checks_shapes = True  # type: ignore[attr-defined]
        cls.score_features = score_features  # type: ignore[method-assign]

    # ------------------------------------------------------------------ hyperparameters
    @classmethod
    def hyperparameter_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in self.hyperparameter_names()}

    def set_params(self: D, **params: Any) -> D:
        """Change hyperparameters (checked). Fitted state that depends on them is refitted by
        the next ``fit`` / ``refit_features``."""
        names = self.hyperparameter_names()
        for k in params:
            if k not in names:
                raise ConfigError(f"{self.name} has no hyperparameter {k!r}.{did_you_mean(k, names)} Valid: {names}.")
        old = self.get_params()
        for k, v in params.items():
            setattr(self, k, v)
        try:
            self._check_params()
        except Exception:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        return self

    def _check_params(self) -> None:
        for k, c in self.constraints.items():
            c.check(k, getattr(self, k))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ the pieces subclasses write
    def capture_spec(self, adapter: Adapter, stage: str) -> CaptureSpec | None:
        """Features needed at ``stage`` ("fit", "score", "calibrate").

        ``"calibrate"`` is captured for held-out samples during the first fit pass; return
        ``None`` there if the score features are only known after fitting (they are then
        captured in one extra pass over the held-out samples).
        """
        return CaptureSpec(logits=True)

    def _fit_begin(self, adapter: Adapter) -> None:
        """Reset statistics (called before the first batch)."""

    def _fit_update(self, feats: Features) -> None:
        """Accumulate statistics from one batch of fit features."""

    def _fit_end(self) -> None:
        """Finish the fit (solve, select, build indices)."""

    def _fit(self, stream: FitStream, calib_store: list[Features] | None, calib_spec: CaptureSpec | None) -> None:
        """Default single-pass fit over ``stream``. Multi-pass detectors override this."""
        self._fit_begin(stream.adapter)
        spec = self.capture_spec(stream.adapter, "fit")
        for feats in stream.features(spec, calib_spec=calib_spec, calib_store=calib_store):
            self._check_labels(feats)
            self._fit_update(feats)
        self._fit_end()

    def score_features(self, feats: Features) -> torch.Tensor:
        """Score captured features: float tensor ``[B]``, higher = more in-distribution."""
        raise NotImplementedError

    # ------------------------------------------------------------------ binding to a model
    def attach(
        self: D, model: nn.Module, adapter: Adapter | None = None, *, strict: bool = True, tag: str | None = None
    ) -> D:
        """Bind the detector to ``model`` without fitting (for loaded or fit-free detectors).

        A fitted detector checks that ``model`` is the model it was fitted on (its
        :attr:`fingerprint`; a model that has not seen an input yet runs once on a blank sample
        of the fit input shape) and raises :class:`~normscore.errors.ModelMismatchError` naming
        both fingerprints when it is not. ``strict=False`` reuses it anyway, with a warning.
        ``tag``: also require the fingerprint's tag (given to ``fit``) to be this one.
        """
        adapter = self._resolve_adapter(model, adapter)
        self._verify_model(adapter, self.fingerprint, fitted=self.is_fitted, strict=strict, tag=tag)
        return self._bind(model, adapter)

    @staticmethod
    def _resolve_adapter(model: nn.Module, adapter: Adapter | None) -> Adapter:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"attach/fit needs a torch.nn.Module model, got {type(model).__name__}.")
        if adapter is not None and adapter.model is not model:
            raise ConfigError("the adapter passed was built for a different model.")
        return adapter if adapter is not None else get_adapter(model)

    def _bind(self: D, model: nn.Module, adapter: Adapter | None = None) -> D:
        """Bind to ``model`` without any check (``fit`` binds before it replaces the state)."""
        self._adapter = self._resolve_adapter(model, adapter)
        self._model = model
        return self.to(model_device(model))

    @property
    def fingerprint(self) -> ModelFingerprint | None:
        """The fingerprint of the model the detector was fitted on (``None`` before ``fit``, and
        for detectors saved by older normscore versions, which stored none)."""
        return getattr(self, "fingerprint_", None)

    def _verify_model(
        self, adapter: Adapter, fp: ModelFingerprint | None, *, fitted: bool, strict: bool, tag: str | None
    ) -> None:
        """Raise :class:`ModelMismatchError` (warn with ``strict=False``) when ``adapter``'s model
        is not the one fingerprinted by ``fp`` (the fingerprint of a state, ``fitted`` or not)."""
        if fp is None:
            if fitted:
                warnings.warn(
                    f"{self.name} has no model fingerprint (it was saved by an older normscore, or fitted on "
                    "cached features of a model that had not seen an input), so normscore cannot check that "
                    "it belongs to this model. Refit it on this model and save it again to get the check.",
                    UserWarning,
                    stacklevel=3,
                )
            return
        try:
            if not adapter.resolved and fp.input_shape is not None:
                model = adapter.model
                adapter.ensure_resolved(
                    torch.zeros((1, *fp.input_shape), device=model_device(model), dtype=model_dtype(model))
                )
            given = ModelFingerprint.of(adapter, fp.features, tag=fp.tag if tag is None else tag)
        except NormscoreError as e:
            msg = (
                f"{self.name} was fitted on {fp.model_name} with inputs of shape "
                f"{list(fp.input_shape or ())}, and the model given cannot be compared with it: {e} "
                "Refit the detector on this model (det.fit(model, id_loader)); strict=False attaches it unchecked."
            )
            if strict:
                raise ModelMismatchError(msg) from e
            warnings.warn(msg, UserWarning, stacklevel=3)
            return
        if fp.differences(given):
            msg = mismatch_message(self.name, fp, given)
            if strict:
                raise ModelMismatchError(msg)
            warnings.warn(
                f"strict=False: {mismatch_message(self.name, fp, given, hint=False)}", UserWarning, stacklevel=3
            )

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise NotFittedError(
                f"{self.name} is not attached to a model. Call fit(model, id_loader), or "
                "attach(model) for a loaded detector."
            )
        return self._model

    @property
    def adapter(self) -> Adapter:
        self.model  # noqa: B018 - raises the right error
        assert self._adapter is not None
        return self._adapter

    def fit_needs_labels(self) -> bool:
        """Whether this fit (with these hyperparameters) needs class labels from the loader."""
        return bool(self.needs_labels)

    def _check_labels(self, feats: Features) -> None:
        if self.needs_labels and "labels" not in feats:
            raise InputError(
                f"{self.name} is class-conditional and needs labels, but the loader yields no "
                "labels. Use a loader that yields (x, y) pairs of ID training data."
            )

    # ------------------------------------------------------------------ fit
    def fit(
        self: D,
        model: nn.Module,
        loader: Iterable,
        *,
        adapter: Adapter | None = None,
        calibration: float = 0.1,
        tpr: float = 0.95,
        max_samples: int | None = None,
        progress: bool | None = None,
        tag: str | None = None,
    ) -> D:
        """Fit on in-distribution data and calibrate the ``predict`` threshold.

        Parameters
        ----------
        model: the classifier (left exactly as it was: mode, parameters, buffers, hooks, grads).
        loader: re-iterable batches of ID training data: tensors, ``(x, y)`` or dicts.
        adapter: an :class:`~normscore.Adapter` with overrides (default: automatic).
        calibration: share of samples held out to calibrate the threshold (0 = none).
        tpr: ID true-positive rate the threshold keeps on the held-out samples.
        max_samples: stop after this many samples.
        progress: show a progress bar (default ``None``: when stderr is a terminal).
        tag: a label of the model version (e.g. ``"v3"``) kept in the detector's
            :attr:`fingerprint`; ``attach(model, tag=...)`` / ``load(..., tag=...)`` require it.
        """
        if not 0.0 < tpr <= 1.0:
            raise ConfigError(f"tpr must be in (0, 1], got {tpr}.")
        self._bind(model, adapter)
        stream = FitStream(
            self.adapter,
            loader,
            calibration=calibration,
            max_samples=max_samples,
            progress=progress,
            desc=f"fit {self.name}",
        )
        fit_detectors([self], stream, tpr=tpr, tag=tag)
        return self

    def calibrate(self: D, loader: Iterable, *, tpr: float = 0.95, max_samples: int | None = None) -> D:
        """Calibrate the ``predict`` threshold on held-out ID data (replaces the fit's)."""
        self._check_fitted()
        stream = FitStream(self.adapter, loader, calibration=0.0, max_samples=max_samples)
        spec = self.capture_spec(self.adapter, "score")
        scores = [self.score_features(f) for f in stream.features(spec, split="all")]
        self.decision_ = Decision.calibrate(torch.cat(scores), tpr)
        return self

    def fit_features(
        self: D,
        features: Features | Iterable[Features],
        *,
        calibration: float = 0.1,
        tpr: float = 0.95,
        tag: str | None = None,
    ) -> D:
        """Fit on features captured earlier (e.g. a feature cache) instead of running the model.

        ``features`` are batches in loader order holding what ``capture_spec("fit")`` and
        ``capture_spec("calibrate")`` ask for (plus ``"labels"`` for class-conditional
        detectors). The detector must be attached to the model the features came from
        (``attach(model)``), because head weights are read from it. The calibration split is
        the same as in :meth:`fit`. Only single-pass, feature-only detectors support this.
        """
        batches = [features] if isinstance(features, Features) else features
        fit_detectors([self], None, tpr=tpr, feature_batches=batches, calibration=calibration, tag=tag)
        return self

    def _reset_fitted(self) -> None:
        for k in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, k)

    @property
    def is_fitted(self) -> bool:
        return bool(getattr(self, "fitted_", False))

    def _check_fitted(self) -> None:
        if self.needs_fit and not self.is_fitted:
            raise NotFittedError(f"{self.name} is not fitted yet. Call det.fit(model, id_loader) first.")
        self.model  # noqa: B018 - raises if not attached

    def _expected_shapes(self) -> tuple[str, dict[str, tuple[int, ...]]] | None:
        """``(origin, {key: per-sample shape})`` the features must have, or ``None``.

        Detectors with statistics: the shapes they were fitted on (their fingerprint).
        Detectors without (and fitted ones without a fingerprint): what the attached model
        produces."""
        bound = self.shape_bound
        if not bound:
            return None
        fp = self.fingerprint
        if self.needs_fit and fp is not None:
            shapes = fp.features
            origin = "fitted"
        else:
            adapter = self._adapter
            if adapter is None or not adapter.resolved or (self.needs_fit and not self.is_fitted):
                return None
            spec = self.capture_spec(adapter, "score")
            shapes = self._memo(
                "live_shapes", (adapter, spec), lambda: {k: feature_shape(adapter, k) for k in spec_keys(adapter, spec)}
            )
            origin = "model"
        return origin, {k: s for k, s in shapes.items() if s is not None and feature_kind(k) in bound}

    def _check_feature_shapes(self, feats: Features) -> None:
        """Refuse features whose per-sample shape is not the one the detector works with."""
        if _tracing():  # checked by the eager pass before a trace / export
            return
        exp = self._expected_shapes()
        if exp is None:
            return
        origin, shapes = exp
        for key, shape in shapes.items():
            t = feats.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape[1:]) == shape:
                continue
            got = list(t.shape[1:])
            if origin == "fitted":
                fp = self.fingerprint
                assert fp is not None
                raise InputError(
                    f"{self.name}: the {key!r} features have shape {got} per sample, but the detector was "
                    f"fitted on {list(shape)} (model {fp.model_name}). These features come "
                    "from another model than the one it was fitted on (e.g. a detector reused with "
                    "strict=False on another architecture): refit it on this model (det.fit(model, "
                    "id_loader)), or score features of the model it was fitted on."
                )
            raise InputError(
                f"{self.name}: the {key!r} features have shape {got} per sample, but the attached model "
                f"produces {list(shape)}. Score features captured from the attached model "
                "(normscore.capture(det.adapter, x, det.capture_spec(det.adapter, 'score'))), or attach "
                "the model they come from."
            )

    # ------------------------------------------------------------------ score / predict
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """OOD score of a batch ``x`` [B, C, H, W]: float tensor [B], higher = more ID."""
        self._check_fitted()
        feats = capture(self.adapter, x, self.capture_spec(self.adapter, "score"))
        return self.score_features(feats)

    @property
    def decision(self) -> Decision:
        d = getattr(self, "decision_", None)
        if d is None:
            raise NotFittedError(
                f"{self.name} has no calibrated threshold. Fit with calibration > 0 or call "
                "det.calibrate(held_out_id_loader)."
            )
        return d

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Bool tensor [B]: True = OOD (score below the calibrated threshold)."""
        d = self.decision
        return self.score(x) < d.threshold

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and fitted state: ``{"detector", "params", "fitted", "tensors"}``."""
        fitted: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for k, v in vars(self).items():
            if not k.endswith("_") or k.startswith("_"):
                continue
            if isinstance(v, torch.Tensor):
                tensors[k] = v.detach().cpu()
            elif isinstance(v, Decision):
                fitted[k] = {"__decision__": v.to_dict()}
            elif isinstance(v, ModelFingerprint):
                fitted[k] = {"__fingerprint__": v.to_dict()}
            else:
                fitted[k] = v
        return {"detector": self.name, "params": self.get_params(), "fitted": fitted, "tensors": tensors}

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Restore hyperparameters and fitted state. An attached detector first checks that
        the state was fitted on the attached model (see :meth:`attach`; ``strict=False`` skips)."""
        if state.get("detector") != self.name:
            raise ConfigError(f"state is for detector {state.get('detector')!r}, not {self.name!r}.")
        fitted = dict(state.get("fitted", {}))
        for k, v in fitted.items():
            if isinstance(v, dict) and "__decision__" in v:
                fitted[k] = Decision(**v["__decision__"])
            elif isinstance(v, dict) and "__fingerprint__" in v:
                fitted[k] = ModelFingerprint.from_dict(v["__fingerprint__"])
        if self._adapter is not None:
            fp = fitted.get("fingerprint_")
            fp = fp if isinstance(fp, ModelFingerprint) else None
            self._verify_model(self._adapter, fp, fitted=bool(fitted.get("fitted_")), strict=strict, tag=None)
        self.set_params(**state.get("params", {}))
        self._reset_fitted()
        for k, v in fitted.items():
            setattr(self, k, v)
        dev = None
        if self._model is not None:
            dev = model_device(self._model)
        for k, v in state.get("tensors", {}).items():
            setattr(self, k, v.to(dev) if dev is not None else v)

    def save(self, path: str) -> None:
        """Save hyperparameters and fitted state (no pickle; see :mod:`normscore.io`)."""
        write_state(path, "detector", self.state_dict, [self.name] if self.needs_fit and not self.is_fitted else [])

    def _memo(self, name: str, key: tuple, build: Any) -> Any:
        """``build()`` cached under ``name`` (a :class:`~normscore.detectors._zoo.LazyCache`
        per name) until ``key`` changes: tensors in it by identity and in-place version. For
        score-time constants derived from fitted state or the model's head parameters, so they
        are not recomputed for every batch. Pass stable objects (fitted attributes,
        ``nn.Parameter``s), not fresh views."""
        caches = self.__dict__.setdefault("_memo_cache", {})
        cache = caches.get(name)
        if cache is None:
            cache = caches[name] = LazyCache()
        return cache.get(key, build)

    def to(self: D, device: torch.device | str) -> D:
        """Move fitted tensors to ``device``."""
        for k, v in list(vars(self).items()):
            if k.endswith("_") and isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
        return self

    # ------------------------------------------------------------------ metadata
    @classmethod
    def info(cls) -> dict[str, Any]:
        sig = inspect.signature(cls.__init__)
        return {
            "name": cls.name,
            "class": cls.__name__,
            "paper": cls.paper,
            "formula": cls.formula,
            "needs_labels": cls.needs_labels,
            "needs_gradients": cls.needs_gradients,
            "needs_fit": cls.needs_fit,
            "feature_only": cls.feature_only,
            "hyperparameters": {p.name: p.default for p in sig.parameters.values() if p.name != "self"},
            "search_space": dict(cls.search_space),
        }


# ---------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[D]) -> type[D]:
    """Class decorator: add a detector class to the registry under ``cls.name``."""
    name = cls.name
    if not name or name != name.lower() or not name.replace("_", "").isalnum():
        raise ValueError(f"detector name {name!r} must be lower-case snake case")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"detector name {name!r} is already registered")
    for p in cls.search_space:
        if p not in cls.hyperparameter_names():
            raise ValueError(f"{name}: search space key {p!r} is not a hyperparameter")
    _REGISTRY[name] = cls
    return cls


def detector_class(name: str) -> type[Detector]:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown detector {name!r}.{did_you_mean(name, _REGISTRY)} Available: {', '.join(sorted(_REGISTRY))}."
        ) from None


def create(name: str, **hyperparameters: Any) -> Detector:
    """Create a registered detector by name, e.g. ``create("energy", temperature=2.0)``."""
    if not isinstance(name, str):
        raise ConfigError(f"detector name must be a string, got {type(name).__name__}.")
    return detector_class(name)(**hyperparameters)


def list_detectors(*, needs_labels: bool | None = None, needs_gradients: bool | None = None) -> list[str]:
    """Names of the registered detectors, optionally filtered."""
    _ensure_loaded()
    out = []
    for n, c in sorted(_REGISTRY.items()):
        if needs_labels is not None and c.needs_labels != needs_labels:
            continue
        if needs_gradients is not None and c.needs_gradients != needs_gradients:
            continue
        out.append(n)
    return out


def detector_info(name: str) -> dict[str, Any]:
    return detector_class(name).info()


def _ensure_loaded() -> None:
    from . import _all  # noqa: F401 - importing registers every built-in detector


# ---------------------------------------------------------------------------------------------
# fitting one or several detectors over one stream


def _is_single_pass(det: Detector) -> bool:
    """True when the detector uses the default streamed fit without a backward pass."""
    if type(det)._fit is not Detector._fit:
        return False
    spec = det.capture_spec(det.adapter, "fit")
    return spec is None or spec.backward is None


def _add_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.numel(), b.numel())
    return torch.nn.functional.pad(a, (0, n - a.numel())) + torch.nn.functional.pad(b, (0, n - b.numel()))


def _warn_empty_classes(names: list[str], counts: torch.Tensor | None, num_classes: int | None) -> None:
    """Warn when the fit labels leave head classes of per-class detectors without samples."""
    if not names or counts is None or not num_classes:
        return
    counts = _add_counts(counts, torch.zeros(int(num_classes), dtype=counts.dtype))
    all_reduce_sum(counts)  # every rank's labels (a shard may lack classes the others have)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:8])) + (", ..." if len(empty) > 8 else "")
        warnings.warn(
            f"{', '.join(names)}: only {num_classes - len(empty)} of {num_classes} head classes have fit "
            f"samples; the {len(empty)} others (classes {shown}) get no class statistics, so ID images "
            "of those classes score as OOD. Fit on labelled ID data that covers every class the model "
            "predicts.",
            CalibrationWarning,
            stacklevel=4,
        )


def fit_detectors(
    dets: list[Detector],
    stream: FitStream | None,
    *,
    tpr: float = 0.95,
    feature_batches: Iterable[Features] | None = None,
    calibration: float | None = None,
    tag: str | None = None,
) -> None:
    """Fit ``dets`` (already attached to one model) sharing model passes.

    Single-pass detectors and detectors without statistics share **one** pass: the union of
    their capture specs is captured once per batch. Each fit detector sees the fit split and
    its calibration features are kept from the same pass; detectors without statistics
    calibrate on every sample. Multi-pass detectors (e.g. gradient subspaces) then run their
    own passes over ``stream``.

    With ``feature_batches`` (cached features, e.g. from ``normscore-bench``) instead of a
    stream, the same split is applied to the rows of the cached batches in order; only
    single-pass, feature-only detectors can be fitted this way.

    Each detector keeps the :class:`~normscore.fingerprint.ModelFingerprint` of the model
    (with ``tag``) and of the features it scores, when the adapter has resolved the model.
    """
    if stream is not None:
        adapter = stream.adapter
        stride = stream.stride
        stream.need_labels = [d.name for d in dets if d.fit_needs_labels()]
    else:
        if feature_batches is None:
            raise ValueError("fit_detectors needs a stream or feature batches")
        adapter = dets[0].adapter
        cal = 0.1 if calibration is None else calibration
        if not 0.0 <= cal < 1.0:
            raise ConfigError(f"calibration must be in [0, 1), got {cal}.")
        stride = round(1.0 / cal) if cal > 0 else 0
    for d in dets:
        d._reset_fitted()
    calibrating = stride > 0
    fitfree = [d for d in dets if not d.needs_fit]
    single = [d for d in dets if d.needs_fit and _is_single_pass(d)]
    multi = [d for d in dets if d.needs_fit and d not in single]
    if stream is None:
        bad = [d.name for d in multi + single + fitfree if not d.feature_only] + [d.name for d in multi]
        if bad:
            raise ConfigError(
                f"detectors {sorted(set(bad))} need the model during fit (several passes or input "
                "gradients); fit them with fit(model, loader) instead of cached features."
            )

    calib_specs: dict[int, CaptureSpec | None] = {}
    union: CaptureSpec | None = None
    for d in single:
        fs = d.capture_spec(adapter, "fit")
        cs = d.capture_spec(adapter, "calibrate") if calibrating else None
        calib_specs[id(d)] = cs
        for s_ in (fs, cs):
            if s_ is not None:
                union = s_ if union is None else union | s_
    for d in fitfree:
        sp = d.capture_spec(adapter, "calibrate") or d.capture_spec(adapter, "score")
        union = sp if union is None else union | sp

    def shared_batches():
        if stream is not None:
            for b in stream.batches():
                feats = capture(adapter, b.x, union, validated=True, index=b.index)
                if b.y is not None:
                    feats["labels"] = b.y
                yield feats, b.index
        else:
            seen = 0
            for feats in feature_batches:
                n = feats.batch_size
                yield feats, torch.arange(seen, seen + n)
                seen += n
            if seen == 0:
                raise InputError("no cached features to fit on (0 samples).")
            shared_batches.n_seen = seen

    calib_parts: dict[int, list[Features]] = {id(d): [] for d in single}
    free_scores: dict[int, list[torch.Tensor]] = {id(d): [] for d in fitfree}
    n_seen = 0
    per_class = [d.name for d in single if d.per_class]
    class_counts: torch.Tensor | None = None
    if union is not None or stream is None:
        for d in single:
            d._fit_begin(adapter)
        for feats, index in shared_batches():
            n_seen += feats.batch_size
            cmask = ((index % stride) == (stride - 1)) if calibrating else torch.zeros_like(index, dtype=torch.bool)
            any_cal = bool(cmask.any())
            dev = next(iter(feats.values())).device
            feats["index"] = index.to(dev)  # global sample positions (see _data.unpack_batch_index)
            dev_mask = cmask.to(dev) if any_cal else None
            fit_feats = feats if not any_cal else feats.select(~dev_mask)
            for d in single:
                if fit_feats.batch_size:
                    d._check_labels(fit_feats)
                    d._fit_update(fit_feats)
                if any_cal and calib_specs[id(d)] is not None:
                    calib_parts[id(d)].append(feats.select(dev_mask))
            if per_class and "labels" in fit_feats and fit_feats.batch_size:
                c = fit_feats["labels"].long().bincount(minlength=int(adapter.num_classes or 0)).cpu()
                class_counts = c if class_counts is None else _add_counts(class_counts, c)
            for d in fitfree:
                free_scores[id(d)].append(d.score_features(feats))
        for d in single:
            d._fit_end()
        _warn_empty_classes(per_class, class_counts, adapter.num_classes)

    for d in multi:
        assert stream is not None
        cs = d.capture_spec(adapter, "calibrate") if calibrating else None
        store: list[Features] = []
        d._fit(stream, store if cs is not None else None, cs)
        calib_specs[id(d)] = cs
        calib_parts[id(d)] = store

    for d in single + multi:
        if not calibrating:
            continue
        if calib_specs[id(d)] is not None:
            calib = Features.cat(calib_parts[id(d)])
        else:
            if stream is None:
                raise ConfigError(f"{d.name} cannot calibrate from cached features; use fit(model, loader).")
            spec = d.capture_spec(adapter, "score")
            calib = Features.cat(list(stream.features(spec, split="calibration")))
        local = d.score_features(calib) if calib.batch_size > 0 else torch.empty(0)
        gathered = all_gather_cat(local.float().cpu())  # every rank's held-out scores
        if gathered.numel() > 0:
            d.decision_ = Decision.calibrate(gathered, tpr)
    for d in fitfree:
        local = torch.cat(free_scores[id(d)]).float().cpu() if free_scores[id(d)] else torch.empty(0)
        gathered = all_gather_cat(local)
        if gathered.numel() > 0:
            d.decision_ = Decision.calibrate(gathered, tpr)
    total = all_reduce_int(int(stream.n_seen or 0) if stream is not None else n_seen)
    for d in dets:
        d.n_fit_samples_ = total
        d.fitted_ = True
        if adapter.resolved:
            d.fingerprint_ = ModelFingerprint.of(adapter, spec_keys(adapter, d.capture_spec(adapter, "score")), tag=tag)
