"""normscore: post-hoc out-of-distribution scores for timm and torchvision classifiers.

>>> det = normscore.create("energy").fit(model, id_loader)
>>> det.score(x)      # float tensor [B], higher = more in-distribution
>>> det.predict(x)    # bool tensor [B], True = OOD (threshold calibrated at 95% ID TPR)

The tool packages (``normscore.data``, ``normscore.models``, ``normscore.training``,
``normscore.tools``, ``normscore.bench``, ``normscore.finetune``) are attributes of the package
too but are imported on first access (PEP 562), so ``import normscore`` and the scoring path stay
light. ``normscore.models`` and ``normscore.training`` are the documented names of
``normscore.tools.zoo`` and ``normscore.tools.trainer``.
"""

import importlib
from types import ModuleType

from . import metrics
from ._version import __version__
from .adapters import Adapter, BlockInfo, get_adapter, set_adapter
from .detectors import Decision, Detector, create, detector_class, detector_info, list_detectors, register
from .detectors.dset import DetectorSet
from .detectors.persistence import load, save
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
from .metrics import evaluate
from .pipeline import ScoringModule, score_loader
from .preprocess import input_transform
from .select import Selection, select
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
    "Selection",
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
    "select",
    "set_adapter",
]

#: submodules imported on first attribute access (``normscore.data``), never by ``import normscore``
_LAZY_SUBMODULES = frozenset({"bench", "data", "finetune", "models", "tools", "training"})


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import also sets the attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)
