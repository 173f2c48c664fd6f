"""One SplitMix64 (issue 13, item 10): the reference values, ints and arrays alike, and no second
copy of its constants in the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from normscore.hashing import splitmix64

ROOT = Path(__file__).resolve().parents[1]


def test_splitmix64_matches_the_reference_generator():
    # the first outputs of Vigna's splitmix64.c with state 0 (state += golden, then finalise)
    golden = 0x9E3779B97F4A7C15
    assert int(splitmix64(0)) == 0xE220A8397B1DCDAF
    assert int(splitmix64(golden)) == 0x6E789E6AA1B965F4
    arr = splitmix64(np.array([0, golden], dtype=np.uint64))
    assert arr.dtype == np.uint64 and [int(v) for v in arr] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert int(splitmix64(5, salt=3)) == int(splitmix64((5 + 3 * 0x94D049BB133111EB) % 2**64))


def test_no_second_copy_of_splitmix64():
    hits = [
        str(f.relative_to(ROOT))
        for f in sorted((ROOT / "normscore").rglob("*.py"))
        if f.name != "hashing.py" and "0x9e3779b97f4a7c15" in f.read_text().lower()
    ]
    assert not hits, f"use normscore.hashing.splitmix64: {hits}"
