"""A sharded fit under torch.distributed (torchrun, 2 processes, gloo on CPU) equals a
single-process fit (benchmarks/dist_fit.py does the work; this test runs it small)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import normscore

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "dist_fit.py"
# Every registered detector with a fit (benchmarks/dist_fit.py --detectors all).
# Statistics are float64 sums all-reduced over ranks: equal up to float64 rounding. LDG's state is
# built from float32 per-sample gradients, and a float32 backward pass rounds differently at batch
# size 32 (sharded) than at 64 (single process): equal up to float32 rounding.
TOLERANCE = {"ldg": 1e-4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_torchrun_fit_equals_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--out", str(tmp_path), "--detectors", "all", "--samples", "192"]
    r = subprocess.run([sys.executable, str(SCRIPT), "--single", *common], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())]
    r = subprocess.run([*run, str(SCRIPT), *common], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--compare", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    fitted = [n for n in normscore.list_detectors() if normscore.detector_class(n).needs_fit]
    assert set(report) == set(fitted) and "mahalanobis" in report and "ldg" in report
    for name, diff in report.items():
        assert diff["max_rel_diff"] <= TOLERANCE.get(name, 1e-6), (name, diff)
