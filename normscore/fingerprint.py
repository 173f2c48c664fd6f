"""Model fingerprints: which model a fitted detector belongs to.

A detector's fitted state (class means, a neighbour bank, a subspace, a calibrated threshold)
is only meaningful next to the model it was fitted on. ``fit`` stores a
:class:`ModelFingerprint` of that model in the detector (``det.fingerprint``, saved with it);
``attach``, ``normscore.load(path, model=...)`` and :class:`~normscore.ScoringModule` compare
it with the model they are given and raise :class:`~normscore.errors.ModelMismatchError` when
they differ (``strict=False`` reuses the detector deliberately, with a warning).

The fingerprint holds the architecture (class and timm variant), the number of classes, the
penultimate dimension, the per-sample shapes of the features the detector uses, a SHA-256 of
the head's weights and an optional user ``tag``. The hash is taken over the head's ``W`` and
``b`` cast to float32 on the CPU (little-endian), so a copy of the model on another device or in
float64 has the same fingerprint; a float16/bfloat16 copy rounds the weights and does not.
Models without a linear head hash the parameters of their last module that has any.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .adapters import Adapter
from .taps import feature_shape

__all__ = ["ModelFingerprint", "mismatch_message"]

Shape = tuple[int, ...] | None


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the model a detector was fitted on (JSON-able; compared field by field).

    ``input_shape`` (one sample, ``(C, H, W)``) is not compared: it is kept so that a model
    that has not seen an input yet can be probed once to compute its own fingerprint.
    """

    architecture: str
    variant: str | None
    num_classes: int | None
    num_features: int | None
    features: Mapping[str, Shape]
    head: str | None
    head_sha256: str | None
    tag: str | None = None
    input_shape: tuple[int, ...] | None = field(default=None, compare=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def of(cls, adapter: Adapter, keys: Iterable[str] = (), *, tag: str | None = None) -> ModelFingerprint:
        """The fingerprint of ``adapter``'s (resolved) model for a detector using feature ``keys``."""
        root = adapter.root
        cfg = getattr(root, "pretrained_cfg", None)
        variant = cfg.get("architecture") if isinstance(cfg, Mapping) else None
        head, digest = _head_digest(adapter)
        return cls(
            architecture=f"{type(root).__module__}.{type(root).__qualname__}",
            variant=str(variant) if variant else None,
            num_classes=adapter.num_classes,
            num_features=adapter.num_features if adapter.has_head else None,
            features={k: feature_shape(adapter, k) for k in keys},
            head=head,
            head_sha256=digest,
            tag=tag,
            input_shape=adapter.input_shape,
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = {k: None if v is None else list(v) for k, v in self.features.items()}
        d["input_shape"] = None if self.input_shape is None else list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelFingerprint:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["features"] = {k: None if v is None else tuple(int(i) for i in v) for k, v in d.get("features", {}).items()}
        if kw.get("input_shape") is not None:
            kw["input_shape"] = tuple(int(i) for i in kw["input_shape"])
        return cls(**kw)

    @property
    def model_name(self) -> str:
        """``"module.Class (variant)"``, for messages."""
        return f"{self.architecture} ({self.variant})" if self.variant else self.architecture

    # ------------------------------------------------------------------ comparing and showing
    def differences(self, other: ModelFingerprint) -> list[str]:
        """Names of the compared fields that differ."""
        return [f.name for f in fields(self) if f.compare and getattr(self, f.name) != getattr(other, f.name)]


def _fmt(name: str, value: Any) -> str:
    if name == "features":
        return ", ".join(f"{k} {'absent' if s is None else list(s)}" for k, s in value.items()) or "(none)"
    if name == "head_sha256" and value:
        return f"{value[:16]}..."
    return repr(value)


def mismatch_message(detector: str, fitted: ModelFingerprint, given: ModelFingerprint, *, hint: bool = True) -> str:
    """Both fingerprints side by side, the fields that differ first (the
    :class:`~normscore.errors.ModelMismatchError` message; ``hint`` adds the two ways out)."""
    diff = fitted.differences(given)
    rows = [("field", "fitted on", "given")] + [
        (n, _fmt(n, getattr(fitted, n)), _fmt(n, getattr(given, n))) for n in diff
    ]
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    same = [
        f"{f.name} {_fmt(f.name, getattr(fitted, f.name))}" for f in fields(fitted) if f.compare and f.name not in diff
    ]
    msg = (
        f"{detector} was fitted on another model than the one given: the model fingerprints differ in "
        f"{', '.join(diff)}.\n"
        + "\n".join(f"    {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
        + f"\n    same in both: {'; '.join(same)}"
    )
    if hint:
        msg += (
            "\nA detector's fitted state only fits the model it was fitted on: refit it on this model "
            "(det.fit(model, id_loader)) or load the detector saved for this model. To reuse it "
            "deliberately, pass strict=False (det.attach(model, strict=False), "
            "normscore.load(path, model=model, strict=False))."
        )
    return msg


# ---------------------------------------------------------------------------------------------
# the head hash (cached per module until its parameters change)

_DIGESTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _hashed_module(adapter: Adapter) -> tuple[str | None, nn.Module | None]:
    if adapter.has_head:
        return adapter.head_name, adapter.head
    last: tuple[str | None, nn.Module | None] = (None, None)
    for name, m in adapter.root.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            last = (name, m)
    return last


def _head_digest(adapter: Adapter) -> tuple[str | None, str | None]:
    """``(module name, sha256 hex)`` of the head's ``W`` and ``b`` in float32 (little-endian,
    with their shapes); without a linear head, of the last module that has parameters."""
    name, module = _hashed_module(adapter)
    if module is None:
        return None, None
    if adapter.has_head:
        w, b = adapter.head_weight_bias(copy=False)
        tensors = [w, b]
        live = [module.weight] + ([module.bias] if module.bias is not None else [])
    else:
        tensors = live = [p.detach() for _, p in sorted(module.named_parameters(recurse=False))]
    key = tuple((t.data_ptr(), t._version if not t.is_inference() else -1, t.dtype, t.device) for t in live)
    hit = _DIGESTS.get(module)
    if hit is not None and hit[0] == key:
        return name, hit[1]
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().to("cpu", torch.float32).contiguous().numpy()
        h.update(repr(tuple(a.shape)).encode())
        h.update(a.astype("<f4", copy=False).tobytes())
    digest = h.hexdigest()
    _DIGESTS[module] = (key, digest)
    return name, digest
