"""``save`` and ``load`` of detectors and detector sets: which kind a file holds, the check that
everything is fitted, and attaching a loaded detector to a model. The file format itself is
:mod:`normscore.io`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import FormatError
from ..io import read_state, write_state
from .base import Detector
from .dset import DetectorSet
from .registry import create

__all__ = ["load", "save"]


def save(obj: Any, path: str | os.PathLike) -> None:
    """Save a detector or detector set to ``path`` (atomically: written, then renamed)."""
    kind = "detector" if isinstance(obj, Detector) else type(obj).__name__
    dets = [obj] if isinstance(obj, Detector) else list(getattr(obj, "detectors", {}).values())
    unfitted = [d.name for d in dets if isinstance(d, Detector) and d.needs_fit and not d.is_fitted]
    write_state(path, kind, lambda: obj.state_dict(), unfitted)


def load(
    path: str | os.PathLike, model: nn.Module | None = None, *, strict: bool = True, tag: str | None = None
) -> Any:
    """Load a detector (or detector set) saved with ``save``; attach it to ``model`` if given.

    Attaching checks the model fingerprint stored at fit time: another model (another
    checkpoint or architecture) raises :class:`~normscore.errors.ModelMismatchError`;
    ``strict=False`` attaches it anyway (with a warning). ``tag`` also requires the tag given to
    ``fit``. Files saved by older normscore versions hold no fingerprint: they load and attach unchecked,
    with a warning.
    """
    kind, state = read_state(path)
    if kind == "detector":
        det = create(state["detector"])
    elif kind == "DetectorSet":
        det = DetectorSet.from_state_dict(state)
    else:
        raise FormatError(f"{Path(path)} holds an unknown object kind {kind!r}.")
    if kind == "detector":
        det.load_state_dict(state)
    if model is not None:
        det.attach(model, strict=strict, tag=tag)
    return det
