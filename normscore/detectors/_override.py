"""Change a module's output (or input) inside one call, without changing the model.

Detectors that re-run the rest of the network on a modified intermediate tensor (RankFeat's
rank-1 removal, Monte-Carlo dropout's masks) register a forward hook that *returns* the new
output for the duration of one call. The same hygiene as :mod:`normscore.taps` holds: the hooks
are registered on entry and removed on exit (also when the call raises), and they act only for
the context (thread / task) that registered them, so other calls through the same model at the
same time are unaffected. Use it around :func:`normscore.taps.capture`, which puts the model in
eval mode and restores every flag.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from ..adapters import Adapter

__all__ = ["override"]

_ACTIVE: contextvars.ContextVar[object | None] = contextvars.ContextVar("normscore_override", default=None)

OutputFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
InputFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@contextmanager
def override(
    adapter: Adapter,
    outputs: Mapping[str, OutputFn] | None = None,
    inputs: Mapping[str, InputFn] | None = None,
) -> Iterator[None]:
    """Within the ``with`` block, module ``name``'s output ``out`` is replaced by
    ``outputs[name](module, out)`` and its first positional input ``x`` by
    ``inputs[name](module, x)``, for calls made from this context only."""
    token = object()
    handles = []

    def mine() -> bool:
        return _ACTIVE.get() is token

    try:
        for name, fn in (outputs or {}).items():

            def out_hook(module, args, out, _fn=fn):
                if mine() and isinstance(out, torch.Tensor):
                    return _fn(module, out)
                return None

            handles.append(adapter.module(name).register_forward_hook(out_hook))
        for name, fn in (inputs or {}).items():

            def pre_hook(module, args, _fn=fn):
                if mine() and args and isinstance(args[0], torch.Tensor):
                    return (_fn(module, args[0]), *args[1:])
                return None

            handles.append(adapter.module(name).register_forward_pre_hook(pre_hook))
        reset = _ACTIVE.set(token)
        try:
            yield
        finally:
            _ACTIVE.reset(reset)
    finally:
        for h in handles:
            h.remove()
