"""The detector registry: ``register`` (a class decorator) and the lookups by name (``create``,
``detector_class``, ``detector_info``, ``list_detectors``).

Every built-in family is registered before any lookup can run: importing any
``normscore.detectors`` submodule first runs the package's ``__init__``, which imports
:mod:`normscore.detectors._all` (every family, each registering itself) before anything else. So
the lookups never import the families, which import ``register`` from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from .base import Detector

__all__ = ["create", "detector_class", "detector_info", "list_detectors", "register"]

D = TypeVar("D", bound="type[Detector]")

_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: D) -> D:
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
