"""Detectors: the base class, the registry and every built-in family.

``_all`` is imported first: it registers every built-in family before any lookup can run (see
:mod:`.registry`)."""

from . import _all  # noqa: F401
from .base import Detector
from .constraints import Interval, OneOf
from .decision import Decision
from .registry import create, detector_class, detector_info, list_detectors, register

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
