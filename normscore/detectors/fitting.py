"""Fitting one or several detectors over one stream: the shared pass, the calibration hold-out,
the thresholds and the fingerprints (``fit_detectors``; ``Detector.fit``, ``fit_features`` and
``DetectorSet`` all use it)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..errors import CalibrationWarning, ConfigError, InputError
from ..fingerprint import ModelFingerprint
from ..stats import all_gather_cat, all_reduce_int, all_reduce_sum
from ..stream import FitStream
from ..taps import CaptureSpec, Features, capture, spec_keys
from .decision import Decision
from .sync import sync_state

if TYPE_CHECKING:
    from .base import Detector

__all__ = ["fit_detectors"]


def _shares_the_pass(det: Detector) -> bool:
    """True for a ``"single_pass"`` detector whose fit features need no backward pass (one that
    does runs its streamed fit in a pass of its own: ``Detector._fit``)."""
    if det.fit_mode != "single_pass":
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

    Detectors are grouped by their :attr:`~normscore.detectors.base.Detector.fit_mode`.
    ``"single_pass"`` detectors and detectors without statistics (``"none"``) share **one**
    pass: the union of their capture specs is captured once per batch. Each fit detector sees
    the fit split and its calibration features are kept from the same pass; detectors without
    statistics calibrate on every sample. ``"multi_pass"`` detectors (e.g. gradient subspaces)
    then run their own passes over ``stream`` (``_fit(stream)``). The thresholds of every mode
    are calibrated here, on the held-out samples' scores.

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
    fitfree = [d for d in dets if d.fit_mode == "none"]
    single = [d for d in dets if _shares_the_pass(d)]
    multi = [d for d in dets if d.fit_mode != "none" and d not in single]
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
            sync_state(d)  # the declared fit state, combined over ranks (no-op in one process)
            d._fit_end()
        _warn_empty_classes(per_class, class_counts, adapter.num_classes)

    held: dict[int, Features | None] = {}  # held-out features a multi-pass fit captured anyway
    for d in multi:
        assert stream is not None
        held[id(d)] = d._fit(stream)

    for d in single + multi:
        if not calibrating:
            continue
        if id(d) in held:
            calib = held[id(d)]
        else:
            calib = Features.cat(calib_parts[id(d)]) if calib_specs[id(d)] is not None else None
        if calib is None:
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
