"""normscore: post-hoc out-of-distribution scores for timm and torchvision classifiers.

>>> det = normscore.create("energy").fit(model, id_loader)
>>> det.score(x)      # float tensor [B], higher = more in-distribution
>>> det.predict(x)    # bool tensor [B], True = OOD (threshold calibrated at 95% ID TPR)
"""

from . import metrics
from ._version import __version__
from .adapters import Adapter, BlockInfo, get_adapter, set_adapter
from .detectors import Decision, Detector, create, detector_class, detector_info, list_detectors, register
from .detectors.dset import DetectorSet
from .errors import (
    AdapterError,
    ConfigError,
    FormatError,
    InputError,
    InputTypeError,
    MissingResourceError,
    ModelMismatchError,
    NormscoreError,
    NotFittedError,
)
from .fingerprint import ModelFingerprint
from .io import load, save
from .metrics import evaluate
from .pipeline import ScoringModule, score_loader
from .preprocess import input_transform
from .taps import CaptureSpec, Features, capture

__all__ = [
    "Adapter",
    "AdapterError",
    "BlockInfo",
    "CaptureSpec",
    "ConfigError",
    "Decision",
    "Detector",
    "DetectorSet",
    "Features",
    "FormatError",
    "InputError",
    "InputTypeError",
    "MissingResourceError",
    "ModelFingerprint",
    "ModelMismatchError",
    "NormscoreError",
    "NotFittedError",
    "ScoringModule",
    "__version__",
    "capture",
    "create",
    "detector_class",
    "detector_info",
    "evaluate",
    "get_adapter",
    "input_transform",
    "list_detectors",
    "load",
    "metrics",
    "register",
    "save",
    "score_loader",
    "set_adapter",
]
