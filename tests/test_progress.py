"""Long fits show a progress bar by default in interactive use (stderr is a terminal) and stay
silent otherwise (scripts writing to files, CI, tests)."""

from __future__ import annotations

import sys

import pytest
import torch

import normscore
from normscore.finetune import FinetuneConfig, finetune
from normscore.models import small_cnn
from normscore.pipeline import score_loader
from normscore.progress import progress_enabled


def _runs(model, loader):
    """Each long fit with its default ``progress``, and the bar description it shows."""
    return [
        ("fit mahalanobis", lambda: normscore.create("mahalanobis").fit(model, loader)),
        ("fit set", lambda: normscore.DetectorSet(["mahalanobis", "energy"]).fit(model, loader)),
        ("score", lambda: score_loader(normscore.create("energy").fit(model, loader), loader)),
    ]


@pytest.mark.parametrize("tty", [True, False])
def test_fits_and_score_loader_show_progress_only_on_a_terminal(tiny_model, loader, capsys, monkeypatch, tty):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    for desc, run in _runs(tiny_model, loader):
        capsys.readouterr()
        run()
        err = capsys.readouterr().err
        assert (desc in err) is tty, (desc, err[-300:])


def test_finetune_shows_progress_on_a_terminal(capsys, monkeypatch):
    x, y = torch.rand(16, 1, 12, 12), torch.arange(16) % 4
    cfg = FinetuneConfig(method="ce", epochs=1, batch_size=8, augment=False)
    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        capsys.readouterr()
        finetune(small_cnn(4, 1, 4), (x, y), cfg)
        assert ("finetune ce" in capsys.readouterr().err) is tty


def test_explicit_choice_wins_and_a_closed_stream_is_not_interactive(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress_enabled(True) and not progress_enabled(None) and not progress_enabled(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_enabled(None) and not progress_enabled(False)

    def closed():
        raise ValueError("I/O operation on closed file")

    monkeypatch.setattr(sys.stderr, "isatty", closed)
    assert not progress_enabled(None)
