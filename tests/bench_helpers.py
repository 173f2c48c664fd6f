"""Shared pieces of the normscore-bench tests: a tiny checkpoint, a live test detector, counters."""

from __future__ import annotations

import contextlib

import torch

from normscore.detectors import registry
from normscore.detectors.base import Detector
from normscore.detectors.registry import register
from normscore.models import small_cnn
from normscore.taps import CaptureSpec, Features

LIVE_NAME = "bench_test_live"


class LiveMaxLogit(Detector):
    """A detector that needs the model: max logit minus its mean over a multi-pass fit."""

    name = LIVE_NAME
    paper = "test only"
    needs_fit = True
    feature_only = False
    search_space = {"shift": [0.0, 1.0]}

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True)

    def _fit(self, stream) -> None:
        total, n = 0.0, 0
        for feats in stream.features(CaptureSpec(logits=True)):
            total += float(feats["logits"].amax(1).sum())
            n += feats.batch_size
        self.mean_ = total / n

    def score_features(self, feats: Features) -> torch.Tensor:
        return feats["logits"].float().amax(1) - self.mean_ + self.shift


@contextlib.contextmanager
def live_detector_registered():
    register(LiveMaxLogit)
    try:
        yield LiveMaxLogit
    finally:
        registry._REGISTRY.pop(LIVE_NAME, None)


def save_checkpoint(path: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    m = small_cnn()
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(2):
            m(torch.rand(32, 1, 28, 28))
    torch.save(m.state_dict(), path)
    return path


class Counter:
    """Wraps a function and counts its calls (and the rows of its second argument)."""

    def __init__(self, fn, fail_after: int | None = None) -> None:
        self.fn = fn
        self.calls = 0
        self.rows = 0
        self.fail_after = fail_after

    def __call__(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated interruption")
        self.calls += 1
        if len(args) > 1 and hasattr(args[1], "shape"):
            self.rows += int(args[1].shape[0])
        return self.fn(*args, **kwargs)
