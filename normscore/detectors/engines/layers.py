"""Which layers and parameters a per-sample gradient map covers (:func:`resolve_layers`).

Each parameterised module of the model is classified by the closed form its per-sample
gradient has (:func:`layer_kind`: ``linear``, ``conv``, ``batchnorm``, ``layernorm``,
``groupnorm``, ``generic`` for other leaf modules, ``None`` when it cannot be formed per sample)
and gets a :class:`LayerSlot`: its parameters' place in the concatenated gradient vector. How
often and in which order modules run comes from the adapter's one probe pass
(:attr:`~normscore.adapters.Adapter.module_calls`, :attr:`~normscore.adapters.Adapter.entry_order`);
this module runs no forward pass of its own.

Not covered (reported in :attr:`Resolution.excluded`, never silently zero): parameters owned by
a module that has children (ViT ``cls_token`` / ``pos_embed``, ConvNeXt's block ``gamma``, Swin's
relative position tables, ``nn.MultiheadAttention``'s packed projections), parameters of modules
that never run as modules during the forward pass (e.g. ``MultiheadAttention.out_proj``, whose
weight is used functionally) and BatchNorm without running statistics (it mixes samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...adapters import Adapter
from ...errors import AdapterError, ConfigError

__all__ = ["LayerSlot", "Resolution", "layer_kind", "resolve_layers", "slots_from_names"]


_BN_FORWARD = nn.modules.batchnorm._BatchNorm.forward


def layer_kind(module: nn.Module) -> str | None:
    """Closed-form kind of a module, ``"generic"`` for other leaves, ``None`` if unsupported."""
    t = type(module)
    if isinstance(module, nn.Linear) and t.forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Conv2d) and t.forward is nn.Conv2d.forward:
        return "conv"
    if isinstance(module, nn.Conv1d) and t.forward is nn.Conv1d.forward:
        return "conv"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return None  # uses batch statistics even in eval mode: samples are not independent
        if t.forward is _BN_FORWARD:
            return "batchnorm"
    if isinstance(module, nn.LayerNorm) and t.forward is nn.LayerNorm.forward:
        return "layernorm"
    if isinstance(module, nn.GroupNorm) and t.forward is nn.GroupNorm.forward:
        return "groupnorm"
    if next(module.children(), None) is None:
        return "generic"
    return None


@dataclass
class LayerSlot:
    """One layer of a gradient map: its parameters' place in the concatenated vector."""

    name: str
    module: nn.Module
    kind: str
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    size: int
    offset: int = 0
    calls: int = 1

    def param(self, p: str) -> torch.Tensor:
        return getattr(self.module, p)


def _direct_params(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None and p.is_floating_point()]


def _slot(name: str, module: nn.Module, kind: str) -> LayerSlot:
    if kind in ("linear", "conv", "batchnorm", "layernorm", "groupnorm"):
        ps = [(n, getattr(module, n)) for n in ("weight", "bias") if getattr(module, n, None) is not None]
    else:
        ps = _direct_params(module)
    shapes = tuple(tuple(p.shape) for _, p in ps)
    return LayerSlot(name, module, kind, tuple(n for n, _ in ps), shapes, sum(p.numel() for _, p in ps))


@dataclass
class Resolution:
    """Result of :func:`resolve_layers`."""

    slots: list[LayerSlot]
    excluded: dict[str, str] = field(default_factory=dict)  # parameter name -> reason

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]


def _param_modules(adapter: Adapter) -> list[str]:
    return [n for n in adapter.module_names if _direct_params(adapter.module(n))]


def resolve_layers(adapter: Adapter, params: str | int | Sequence[str], x1: torch.Tensor) -> Resolution:
    """Resolve a parameter-set spec to layer slots (in module order).

    ``params``: ``"all"`` (every parameter of the model), ``"head"`` (the linear head), an int
    ``k`` (the head plus every parameterised module that starts at or after the start of the
    ``k``-th last candidate block, i.e. the last ``k`` blocks and whatever follows them), or a
    list of module names (each with all its sub-modules). ``x1`` is one sample for the adapter's
    probe pass if it has not run yet (which modules run, how often, in which order).
    """
    adapter.ensure_resolved(x1[:1])  # the adapter's one probe pass (a no-op when it already ran)
    calls, start = adapter.module_calls, adapter.entry_order
    pmods = _param_modules(adapter)
    if isinstance(params, str):
        if params == "all":
            chosen = pmods
        elif params == "head":
            chosen = [adapter.head_name]
        else:
            raise ConfigError(
                f"params={params!r}: use 'all', 'head', an int k (last k blocks) or a list of module names."
            )
    elif isinstance(params, int) and not isinstance(params, bool):
        blocks = adapter.block_names
        if not 1 <= params <= len(blocks):
            raise ConfigError(f"params={params}: the model has {len(blocks)} candidate blocks; use 1..{len(blocks)}.")
        first = start.get(blocks[-params])
        if first is None:
            raise AdapterError(f"block {blocks[-params]!r} did not run in the probe forward pass.")
        inside = tuple(b + "." for b in blocks[-params:])
        chosen = [n for n in pmods if start.get(n, -1) >= first or n.startswith(inside)]
    else:
        prefixes = list(params)
        if not prefixes:
            raise ConfigError("params=[] selects no parameters.")
        for p in prefixes:
            adapter.module(p)  # raises AdapterError with a "did you mean" for unknown names
        chosen = [n for n in pmods if any(n == p or n.startswith(p + ".") for p in prefixes)]
    slots: list[LayerSlot] = []
    excluded: dict[str, str] = {}
    for name in chosen:
        m = adapter.module(name)
        kind = layer_kind(m)
        full = [f"{name}.{p}" for p, _ in _direct_params(m)]
        if kind is None:
            why = (
                "BatchNorm without running statistics mixes samples"
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                else f"parameter owned by a composite module ({type(m).__name__}); its use is not observable per layer"
            )
            excluded.update(dict.fromkeys(full, why))
            continue
        if calls.get(name, 0) == 0:
            excluded.update(
                dict.fromkeys(full, f"{type(m).__name__} never runs as a module (weights used functionally or unused)")
            )
            continue
        s = _slot(name, m, kind)
        if s.size == 0:
            continue
        s.calls = calls[name]
        slots.append(s)
    if params == "all":
        owned = {id(p) for n in pmods for _, p in _direct_params(adapter.module(n))}
        for pname, p in adapter.model.named_parameters():
            if id(p) not in owned and p.is_floating_point():
                excluded[pname] = "owned by the model's root module (e.g. a class token or position embedding)"
    if not slots:
        raise ConfigError(f"params={params!r} selects no parameters whose per-sample gradient can be formed.")
    off = 0
    for s in slots:
        s.offset = off
        off += s.size
    return Resolution(slots, excluded)


def slots_from_names(adapter: Adapter, names: Sequence[str]) -> list[LayerSlot]:
    """Rebuild slots from saved layer names (no probe pass; call counts default to 1)."""
    slots = []
    off = 0
    for name in names:
        m = adapter.module(name)
        kind = layer_kind(m)
        if kind is None:
            raise AdapterError(f"layer {name!r} ({type(m).__name__}) is not supported by the gradient engine.")
        s = _slot(name, m, kind)
        s.offset = off
        off += s.size
        slots.append(s)
    return slots
