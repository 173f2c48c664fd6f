"""Detectors: the base class, the registry and every built-in family."""

from . import _all  # noqa: F401
from .base import Decision, Detector, Interval, OneOf, create, detector_class, detector_info, list_detectors, register

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
