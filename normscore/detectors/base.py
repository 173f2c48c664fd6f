"""The detector base class.

A detector is written as three small pieces:

* ``capture_spec(adapter, stage)`` - which features it needs (``stage`` is ``"fit"``,
  ``"score"`` or ``"calibrate"``);
* ``_fit_begin`` / ``_fit_update(features)`` / ``_fit_end`` - streamed statistics (or, for
  detectors with several passes, ``_fit(stream)``); :attr:`Detector.fit_mode` says which;
* ``score_features(features) -> [B]`` - the score, **higher = more in-distribution**.

``fit(model, loader)``, ``score(x)``, ``predict(x)``, ``state_dict()`` and ``save()`` are written
once here and drive the taps. Around it: :mod:`.constraints` (hyperparameter checks),
:mod:`.decision` (the calibrated threshold), :mod:`.registry` (names -> classes) and
:mod:`.fitting` (``fit_detectors``, the shared fit pass).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..errors import ConfigError, InputError, ModelMismatchError, NormscoreError, NotFittedError, did_you_mean
from ..fingerprint import ModelFingerprint, mismatch_message
from ..io import write_state
from ..runmode import model_device, model_dtype
from ..runmode import tracing as _tracing
from ..stream import FitStream
from ..taps import CaptureSpec, Features, capture, feature_kind, feature_shape, prepare_input, spec_keys
from ._zoo import LazyCache
from .constraints import Constraint
from .decision import Decision
from .fitting import fit_detectors
from .sync import REDUCTIONS, sync_state

__all__ = ["FIT_MODES", "Detector"]

#: how a detector fits; see :attr:`Detector.fit_mode`
FIT_MODES = ("none", "single_pass", "multi_pass")

D = TypeVar("D", bound="Detector")


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
    #: how the detector fits (one of :data:`FIT_MODES`): ``"none"`` (no statistics; ``fit`` only
    #: calibrates the threshold), ``"single_pass"`` (streamed ``_fit_begin/_fit_update/_fit_end``
    #: over the pass shared with other detectors) or ``"multi_pass"`` (its own passes over the
    #: fit stream: overrides ``_fit(stream)``). Worked out from the class when not declared; a
    #: declaration that contradicts the class fails when the class is defined.
    fit_mode: ClassVar[str] = "none"
    #: how each fit accumulator combines over ``torch.distributed`` ranks: ``(attribute,
    #: reduction)`` pairs, reductions ``"sum"``, ``"cat"``, ``"moments"`` or ``"merge"`` (see
    #: :mod:`~normscore.detectors.sync`). The base synchronises them once, after the last
    #: ``_fit_update`` and before ``_fit_end``; detectors make no distributed calls.
    _fit_state: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: a ``"cat"`` state of sample positions: after gathering, every ``"cat"`` state is sorted by it
    _fit_order: ClassVar[str | None] = None

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._adapter: Adapter | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass gets its :attr:`fit_mode` (checked against what it implements), and
        every ``score_features`` a subclass defines checks the feature shapes first."""
        super().__init_subclass__(**kwargs)
        cls.fit_mode = cls._implemented_fit_mode()
        for attr, how in cls._fit_state:
            if how not in REDUCTIONS:
                raise TypeError(
                    f"{cls.__name__}._fit_state: {attr!r} has unknown reduction {how!r}; use one of {REDUCTIONS}"
                )
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

    def _fit(self, stream: FitStream) -> Features | None:
        """Fit over ``stream`` in passes of the detector's own; ``"multi_pass"`` detectors
        override this. Returns the held-out calibration samples' features captured with the
        score spec when the fit has them anyway (``None``: the caller captures them in one
        extra pass over the held-out samples after the fit), so calibrating the threshold stays
        with :func:`~normscore.detectors.fitting.fit_detectors`.

        This default runs the streamed fit in a pass of its own (for a ``"single_pass"``
        detector whose fit features need a backward pass, so it cannot share the forward
        pass, or one that needs passes before it: :meth:`_fit_prepass`); the held-out features
        of ``capture_spec("calibrate")`` come from the same pass.
        """
        adapter = stream.adapter
        self._fit_prepass(stream)
        calib_spec = self.capture_spec(adapter, "calibrate") if stream.stride > 0 else None
        store: list[Features] = []
        self._fit_begin(adapter)
        spec = self.capture_spec(adapter, "fit")
        for feats in stream.features(
            spec, calib_spec=calib_spec, calib_store=store if calib_spec is not None else None
        ):
            self._check_labels(feats)
            self._fit_update(feats)
        sync_state(self)
        self._fit_end()
        return Features.cat(store) if calib_spec is not None else None

    def _fit_prepass(self, stream: FitStream) -> None:
        """Passes over ``stream`` that the default :meth:`_fit` runs before its streamed pass
        (e.g. ``layer="normratio"``'s block selection, :mod:`~normscore.detectors.layer`); none here."""

    @classmethod
    def _implemented_fit_mode(cls) -> str:
        """The fit mode the class implements; a declared ``fit_mode`` must be this one."""
        own_passes = cls._fit is not Detector._fit
        if own_passes and not cls.needs_fit:
            raise TypeError(f"{cls.__name__} overrides _fit but declares needs_fit = False; set needs_fit = True.")
        mode = "multi_pass" if own_passes else "single_pass" if cls.needs_fit else "none"
        declared = cls.__dict__.get("fit_mode")
        if declared is not None and declared != mode:
            raise TypeError(
                f"{cls.__name__} declares fit_mode = {declared!r} but implements {mode!r} "
                f"({'overrides' if own_passes else 'does not override'} _fit, needs_fit = {cls.needs_fit}); "
                f"the fit modes are {list(FIT_MODES)}."
            )
        return mode

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

    def check_model(self, adapter: Adapter) -> None:
        """Raise :class:`~normscore.errors.NotApplicableError` if this detector, as configured,
        cannot work on ``adapter``'s model (checked on attach/fit; e.g. ``mcd`` needs dropout
        modules). The default accepts every model."""

    def _bind(self: D, model: nn.Module, adapter: Adapter | None = None) -> D:
        """Bind to ``model`` without the fingerprint check (``fit`` binds before it replaces the
        state); :meth:`check_model` still refuses a model the detector cannot work on."""
        adapter = self._resolve_adapter(model, adapter)
        self.check_model(adapter)
        self._adapter = adapter
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

    def _validated_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked and converted for the model (the adapter resolved on it), for a
        detector that runs its own model passes in ``score`` instead of one shared capture
        (ODIN, MC dropout, ...); raises if the detector is not fitted."""
        self._check_fitted()
        x = prepare_input(x, self.adapter, self.model)
        self.adapter.ensure_resolved(x)
        return prepare_input(x, self.adapter, self.model)

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
