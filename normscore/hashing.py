"""SplitMix64: the one counter-based hash behind every position-seeded choice (row samples,
calibration sketches, jigsaw permutations), so a choice depends on a sample's position only,
never on the batching."""

from __future__ import annotations

import numpy as np

__all__ = ["splitmix64"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(z: np.ndarray | int, salt: int = 0) -> np.ndarray:
    """SplitMix64 (Steele, Lea & Flood 2014) of ``z + salt * 0x94D049BB133111EB`` elementwise,
    in wrapping uint64 arithmetic; ``z`` is an int or an integer array (values in ``[0, 2**64)``).
    Returns uint64 (a numpy scalar for an int)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(salt) * _M2 + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))
