"""Exception classes.

Every error normscore raises on bad input derives from :class:`NormscoreError` and from the
built-in class a caller would expect (``ValueError`` or ``TypeError``), so both
``except normscore.NormscoreError`` and ``except ValueError`` work. Messages name the problem
and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NormscoreError(Exception):
    """Base class of every normscore error."""


class InputError(NormscoreError, ValueError):
    """The data passed to ``fit``/``score`` cannot be used (shape, dtype, values, device)."""


class InputTypeError(NormscoreError, TypeError):
    """The data passed to ``fit``/``score`` is of an unsupported type."""


class ConfigError(NormscoreError, ValueError):
    """An unknown or invalid hyperparameter, detector name, block name or option."""


class NotApplicableError(ConfigError):
    """The detector cannot work on this model as configured (e.g. Monte-Carlo dropout on a model
    without dropout modules). ``normscore-bench`` lists such detectors as not applicable instead
    of failed."""


class ModelMismatchError(ConfigError):
    """A fitted detector was given another model than the one it was fitted on (the model
    fingerprints differ); ``strict=False`` reuses it deliberately."""


class NotFittedError(NormscoreError, RuntimeError):
    """``score``/``predict`` was called on a detector that needs ``fit`` first."""


class AdapterError(NormscoreError, ValueError):
    """normscore could not find a part of the model it needs (head, penultimate, blocks)."""


class FormatError(NormscoreError, ValueError):
    """A saved file is not a valid normscore file (truncated, tampered, pickle, future version)."""


class MissingResourceError(NormscoreError, FileNotFoundError):
    """Local data or weights are missing; the message says what to install or where to put it."""


class CalibrationWarning(UserWarning):
    """A fit or calibration ran but its result is unreliable: a held-out set too small for the
    threshold, or fit labels that leave head classes without samples."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""
