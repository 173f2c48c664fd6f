"""How a model is run for one call, shared by every layer that runs it (adapters' probe, taps,
pipelines, the per-sample gradient engine, the trainer's evaluation).

* :func:`eval_mode` puts the model in eval mode for the duration of a call and restores every
  module's own ``training`` flag afterwards (reference counted, so concurrent calls are safe);
* :func:`tracing` says whether the code runs under ``torch.jit.trace`` / ``torch.compile`` /
  ``torch.export``;
* :func:`model_device` and :func:`model_dtype` read where and in which float type a model lives.

It imports nothing from normscore, so adapters and taps can both use it.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["eval_mode", "model_device", "model_dtype", "tracing"]

_GUARD_LOCK = threading.Lock()
_GUARDS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` (every submodule) in eval mode; restore each module's flag on exit.

    Re-entrant and thread-safe: the first caller saves the flags, the last one restores them.
    """
    with _GUARD_LOCK:
        entry = _GUARDS.get(model)
        if entry is None:
            flags = [(m, m.training) for m in model.modules()]
            entry = [0, flags]
            _GUARDS[model] = entry
            for m, _ in flags:
                m.training = False
        entry[0] += 1
    try:
        yield
    finally:
        with _GUARD_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                for m, flag in entry[1]:
                    m.training = flag
                del _GUARDS[model]


def tracing() -> bool:
    """True under ``torch.jit.trace``, ``torch.compile`` and ``torch.export``: code that calls
    NumPy/faiss or caches values must take its traceable path then."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling())


def model_device(model: nn.Module) -> torch.device:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
