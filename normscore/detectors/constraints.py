"""Hyperparameter constraints: each detector class maps a hyperparameter to one of these, and
``Detector`` checks them after construction and in ``set_params``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, did_you_mean

__all__ = ["Constraint", "Interval", "OneOf"]


class Constraint:
    def check(self, name: str, value: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class Interval(Constraint):
    """A real (or integer) in ``[low, high]`` with optional open ends."""

    low: float = -math.inf
    high: float = math.inf
    closed: str = "both"  # "both", "left", "right", "neither"
    integer: bool = False
    allow_none: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "an integer" if self.integer else "a number"
            raise ConfigError(f"hyperparameter {name}={value!r} must be {kind}.")
        if self.integer and not float(value).is_integer():
            raise ConfigError(f"hyperparameter {name}={value!r} must be an integer.")
        lo_ok = value >= self.low if self.closed in ("both", "left") else value > self.low
        hi_ok = value <= self.high if self.closed in ("both", "right") else value < self.high
        if math.isnan(float(value)) or not (lo_ok and hi_ok):
            lb = "[" if self.closed in ("both", "left") else "("
            rb = "]" if self.closed in ("both", "right") else ")"
            raise ConfigError(
                f"hyperparameter {name}={value!r} is out of range; it must be in {lb}{self.low}, {self.high}{rb}."
            )


@dataclass(frozen=True)
class OneOf(Constraint):
    values: tuple

    def check(self, name: str, value: Any) -> None:
        if value not in self.values:
            raise ConfigError(
                f"hyperparameter {name}={value!r} is not allowed; choose one of {list(self.values)}."
                + did_you_mean(str(value), [str(v) for v in self.values])
            )
