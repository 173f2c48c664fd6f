"""Declared fit state and its one synchronisation across ``torch.distributed`` ranks.

A detector (or a mergeable accumulator it holds) declares how each fit accumulator combines
over ranks, as torchmetrics' ``add_state(..., dist_reduce_fx=...)`` does::

    _fit_state = (("_sums", "sum"), ("_counts", "sum"))

The fit machinery (:mod:`~normscore.detectors.fitting` and the base ``Detector._fit``) calls
:func:`sync_state` once, after the last ``_fit_update`` and before ``_fit_end``; so ``_fit_end``
sees the state of the whole data set and detector files contain no distributed calls. Without an
initialised process group :func:`sync_state` returns at once (single-process fits are untouched).

Reductions (every rank makes the same collective calls, in declaration order):

* ``"sum"`` - a tensor (summed in place), a tuple/list of tensors, an ``int`` or a ``float``;
* ``"cat"`` - a tensor or a list of tensors (concatenated), gathered in rank order; with
  ``_fit_order = "<name>"`` every ``"cat"`` state is then sorted by that (position) state, so
  the rows come in the order a single process would have seen them;
* ``"moments"`` - :class:`~normscore.stats.RunningMoments` / :class:`~normscore.stats.ClassMoments`
  (exact merge of mergeable moments);
* ``"merge"`` - an object that declares its own ``_fit_state`` (synchronised recursively) and may
  define ``_after_sync()`` to combine what was gathered (e.g. a bottom-k row sample).

Multi-pass fits (``_fit(stream)``), which reduce mid-algorithm, call :func:`reduce` with the same
reduction names.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..stats import all_gather_cat, all_reduce_int, all_reduce_sum, distributed_active

__all__ = ["distributed", "gather_in_order", "reduce", "sync_state"]

#: the reduction names a ``_fit_state`` declaration may use
REDUCTIONS = ("sum", "cat", "moments", "merge")


def distributed() -> bool:
    """Whether a fit runs sharded over several ``torch.distributed`` ranks."""
    return distributed_active()


def _sum(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        all_reduce_sum(v)
        return v
    if isinstance(v, (tuple, list)):
        all_reduce_sum(*v)
        return v
    if isinstance(v, bool):
        raise TypeError("a 'sum' fit state cannot be a bool")
    if isinstance(v, int):
        return all_reduce_int(v)
    if isinstance(v, float):
        t = torch.tensor([v], dtype=torch.float64)
        all_reduce_sum(t)
        return float(t.item())
    raise TypeError(f"cannot sum a fit state of type {type(v).__name__}")


def _cat(v: Any) -> Any:
    if isinstance(v, list):
        return [all_gather_cat(torch.cat(v) if v else torch.zeros(0))]
    return all_gather_cat(v)


def reduce(value: Any, how: str) -> Any:
    """Combine one fit accumulator over all ranks (a no-op without a process group); returns the
    combined value (tensors and moments are also combined in place)."""
    if how not in REDUCTIONS:
        raise ValueError(f"unknown fit-state reduction {how!r}; use one of {REDUCTIONS}")
    if not distributed_active():
        return value
    if how == "sum":
        return _sum(value)
    if how == "cat":
        return _cat(value)
    if how == "moments":
        value.all_reduce()
        return value
    sync_state(value)
    return value


def gather_in_order(positions: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's rows of ``tensors`` (aligned with the sample ``positions``) in global position
    order. Single process: the rows sorted by position."""
    order = torch.argsort(all_gather_cat(positions))
    return [all_gather_cat(t)[order] for t in tensors]


def sync_state(obj: Any) -> None:
    """Synchronise every accumulator ``obj._fit_state`` declares, in declaration order."""
    if not distributed_active():
        return
    # looked up on the object: an instance may declare its own (layer_aggregation="sum" members)
    state = getattr(obj, "_fit_state", ())
    name = getattr(obj, "name", type(obj).__name__)
    for attr, how in state:
        value = getattr(obj, attr, None)
        if value is None:
            raise InputError(
                f"{name}: a rank saw no fit samples (its {attr!r} is empty) in a distributed fit; "
                "give every rank at least one batch of the fit split."
            )
        setattr(obj, attr, reduce(value, how))
    key = getattr(obj, "_fit_order", None)
    if key is not None:
        pos = getattr(obj, key)
        order = torch.argsort(pos[0] if isinstance(pos, list) else pos)
        for attr, how in state:
            if how == "cat":
                v = getattr(obj, attr)
                setattr(obj, attr, [v[0][order]] if isinstance(v, list) else v[order])
    hook = getattr(obj, "_after_sync", None)
    if hook is not None:
        hook()
