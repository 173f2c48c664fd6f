"""LDG's scorings: its own (knn, probe, ensemble) and any feature-space detector fitted on the
low-dimensional gradients ``G_low`` (``create("ldg", scoring=NAME)``): which detectors can score
``G_low``, why the others cannot, and how an inner detector is fitted on LDG's gradient bank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError, did_you_mean
from ..taps import Features
from .base import Detector
from .constraints import Constraint
from .distances import ViM
from .registry import detector_class, list_detectors
from .residual import Residual

__all__ = ["DETECTOR_SCORINGS", "NATIVE_SCORINGS", "REFUSED_SCORINGS", "fit_on_rows", "scoring_detector"]


#: scorings LDG computes itself (one fit prepares all of them)
NATIVE_SCORINGS = ("knn", "probe_msp", "probe_energy", "ensemble")

#: feature-space detectors that LDG fits on ``G_low`` (as their "penultimate" features, with the
#: model's logits): their maths reads only the features, the logits and the labels
DETECTOR_SCORINGS = (
    "mahalanobis",
    "rmds",
    "mahalanobis_pp",
    "rmds_pp",
    "vim",
    "residual",
    "she",
    "nnguide",
    "gmm",
    "neco",
    "cfood",
    "relation",
    "grood",
)

_HEAD = "needs the linear head W, b acting on the features it reads, and G_low has no head"
_RELU = "assumes non-negative post-ReLU activations feeding the linear head; G_low is signed and has no head"
_LOGITS = "reads only the logits, so G_low would be unused (create it on the model directly)"
_MODEL = "needs the model itself (input gradients, extra passes or changed activations), not features"
_BLOCKS = "reads intermediate block features, not one feature vector"

#: why the other registered detectors cannot score G_low
REFUSED_SCORINGS = {
    "fdbd": _HEAD + " (distances to its decision boundaries)",
    "nci": _HEAD + " (the class weight rows)",
    "pnml": _HEAD + " (the head's predictive distribution)",
    "separation": _HEAD + " (the class weight rows)",
    "weiper": _HEAD + " (perturbed class projections)",
    "gradnorm": _HEAD + " (the gradient of the head's weights)",
    "react": _RELU,
    "ash": _RELU,
    "scale": _RELU,
    "dice": _RELU,
    "vra": _RELU,
    "lts": _RELU,
    "penultimate_norm": (
        "would rank backwards: G_low is centred on the ID mean, so its norm is a distance from ID data "
        "(use 'mahalanobis')"
    ),
    "msp": _LOGITS,
    "energy": _LOGITS,
    "maxlogit": _LOGITS,
    "entropy": _LOGITS,
    "gen": _LOGITS,
    "klm": _LOGITS,
    "openmax": _LOGITS,
    "tempscale": _LOGITS,
    "odin": _MODEL,
    "mahalanobis_odin": _MODEL,
    "adascale": _MODEL,
    "mcd": _MODEL,
    "rankfeat": _MODEL,
    "grad_uncertainty": _MODEL,
    "nac": _MODEL,
    "ldg": _MODEL,
    "featurenorm": _BLOCKS,
    "gram": _BLOCKS,
    "multi_mahalanobis": _BLOCKS,
    "fusion": "combines detectors of the model; fuse LDG variants instead: "
    "create('fusion', members=[{'name': 'ldg', 'scoring': ...}, ...])",
}


def _scoring_choices() -> str:
    return f"LDG's own {list(NATIVE_SCORINGS)} or a detector fitted on G_low {list(DETECTOR_SCORINGS)}"


class _Scoring(Constraint):
    def check(self, name: str, value: Any) -> None:
        if value in NATIVE_SCORINGS or value in DETECTOR_SCORINGS:
            return
        if isinstance(value, str) and REFUSED_SCORINGS.get(value):
            raise ConfigError(
                f"ldg cannot score its gradient features with {name}={value!r}: {value} "
                f"{REFUSED_SCORINGS[value]}. Scorings that work: {_scoring_choices()}."
            )
        if isinstance(value, str) and value in list_detectors():
            raise ConfigError(
                f"ldg: {name}={value!r} is not among the detectors verified to score the gradient features "
                f"G_low. Scorings that work: {_scoring_choices()}."
            )
        choices = list(NATIVE_SCORINGS) + list(DETECTOR_SCORINGS)
        raise ConfigError(
            f"hyperparameter {name}={value!r} is not allowed; choose {_scoring_choices()}."
            + did_you_mean(str(value), choices)
        )


class _ScoringParams(Constraint):
    def check(self, name: str, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(
                f"hyperparameter {name}={value!r} must be None or a dict of the scoring detector's "
                "hyperparameters, e.g. scoring='mahalanobis', scoring_params={'shrinkage': 0.01}."
            )


class _ZeroOrigin:
    """Stands in for the adapter of ViM's / Residual's fit on ``G_low``: its "head" is
    ``W = I, b = 0``, so ViM's origin ``-pinv(W) b`` is ``0`` = ``G_low(mu)``, the ID mean of the
    fit rows (``G_low`` is centred by construction). Everything else goes to the real adapter."""

    def __init__(self, adapter: Any, det: ViM) -> None:
        self._adapter = adapter
        self._det = det

    def head_weight_bias(self, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._det._moments
        assert m is not None
        k = int(m.mean.shape[0])
        return torch.eye(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


class _GradientViM(ViM):
    """ViM on ``G_low``: the origin is the ID mean (``0``) instead of the head's ``-pinv(W) b``."""

    def _fit_begin(self, adapter) -> None:
        super()._fit_begin(_ZeroOrigin(adapter, self))


class _GradientResidual(Residual):
    """Residual on ``G_low``: the origin is the ID mean (``0``) instead of the head's ``-pinv(W) b``."""

    def _fit_begin(self, adapter) -> None:
        super()._fit_begin(_ZeroOrigin(adapter, self))


_GRADIENT_CLASSES: dict[str, type[Detector]] = {"vim": _GradientViM, "residual": _GradientResidual}


def scoring_detector(name: str, params: Mapping[str, Any] | None = None) -> Detector:
    """A new, unfitted detector ``name`` (one of :data:`DETECTOR_SCORINGS`) for ``G_low``, with
    hyperparameters ``params``; its feature shapes are not checked against the model's."""
    cls = _GRADIENT_CLASSES.get(name) or detector_class(name)
    det = cls(**dict(params or {}))
    det.shape_bound = frozenset()  # its "penultimate" features are G_low [B, K], not the model's
    return det


def fit_on_rows(det: Detector, feats: Features, adapter: Any) -> None:
    """Fit ``det`` on the rows of ``feats`` held in memory (one batch, positions ``0..N-1``):
    the same steps as ``det.fit_features(feats, calibration=0)`` in one process (tested), but no
    cross-rank synchronisation: under ``torch.distributed`` every rank already holds every row."""
    feats = Features(feats)
    feats["index"] = torch.arange(feats.batch_size, device=next(iter(feats.values())).device)
    det._reset_fitted()
    assert det.fit_mode == "single_pass", det.name
    det._fit_begin(adapter)
    det._check_labels(feats)
    det._fit_update(feats)
    det._fit_end()
    det.n_fit_samples_ = feats.batch_size
    det.fitted_ = True
