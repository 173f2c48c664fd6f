"""Block selection for every feature-space detector: the ``layer=`` hyperparameter.

A detector that reads the pooled penultimate features ``h`` mixes in :class:`LayerFeatures`
and reads its feature matrix with :meth:`LayerFeatures.layer_features` instead of
``feats.require("penultimate")``; its capture spec comes from :meth:`LayerFeatures.layer_spec`.
``layer`` then chooses what ``h`` is:

* ``"penultimate"`` (default): the input of the linear head, as before (scores unchanged);
* a block name (one of ``normscore.get_adapter(model).block_names``): the block's output
  pooled with the ``"gap"`` block reduction, ``f_l(x) = (1/|P|) sum_{p in P} A_l(x)[:, p]``
  (mean over spatial positions; over the patch tokens for ViT/Swin/Mixer token layouts, class
  and register tokens excluded - the spatial view FeatureNorm uses);
* a list of block names (``"penultimate"`` may be one of them), or the wildcards
  :data:`~normscore.taps.STAGE_ENDS` (``"*stages"``, the last block of every stage) and
  :data:`~normscore.taps.ALL_BLOCKS` (``"*"``), combined by ``layer_aggregation``:

  - ``"concat"``: one detector on the concatenated features ``h = [f_l1, f_l2, ...]``;
  - ``"sum"``: one detector per block, fitted in the same pass, and the sum of their scores
    ``s(x) = sum_l s_l(f_l(x))`` (uniform weights, as pytorch-ood's ``MultiMahalanobis`` and
    OpenOOD's MDSEns without OOD-fitted weights);

* ``"normratio"``: the block chosen by FeatureNorm's jigsaw NormRatio on the ID fit split
  (:class:`~normscore.detectors.featurenorm.FeatureNorm`'s own fit, reused: ``l* = argmax_l
  mean_i FN_l(x_i) / FN_l(jigsaw(x_i))`` over every candidate block). The choice is stored as
  ``layer_`` and the per-block table as ``layer_table_``. This costs one extra pass over the
  fit split (the NormRatio pass, which runs each batch together with its jigsaw: two forward
  passes' worth), then the usual fit pass at the chosen block; such a detector fits on its own
  (``fit_mode`` ``"multi_pass"`` for that instance), not from cached features.

Fitting at a fixed block (or list of blocks) is one pass, shared with the other detectors, like
``"penultimate"``. Every resolved choice is stored in ``layer_`` (a block name, a list of
names, or ``"penultimate"``) and saved with the detector; fingerprints and shape checks use
the block keys of ``layer_`` automatically (they are the score spec's keys).

Detectors whose formula needs the linear head ``W, b`` on the same features (ViM's origin
``-W^+ b``, fDBD's decision boundaries, ...) declare why in :attr:`LayerFeatures.layer_needs_head`
and refuse any other layer with a :class:`~normscore.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..errors import AdapterError, ConfigError, InputError, NotFittedError
from ..runmode import model_device
from ..stream import FitStream
from ..taps import ALL_BLOCKS, STAGE_ENDS, CaptureSpec, Features, block_key, expand_blocks
from .constraints import Constraint, OneOf
from .sync import sync_state

__all__ = ["AGGREGATIONS", "NORMRATIO", "PENULTIMATE", "LayerFeatures", "normratio_select"]

PENULTIMATE = "penultimate"
NORMRATIO = "normratio"
#: how a list of blocks is combined
AGGREGATIONS = ("concat", "sum")
#: the block reduction of ``layer=<block>``: mean over positions (patch tokens)
_RED = "gap"
_WILDCARDS = (ALL_BLOCKS, STAGE_ENDS)


class _Layer(Constraint):
    """``"penultimate"``, ``"normratio"``, a block name, a wildcard, or a list of names."""

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, str):
            if value:
                return
        elif isinstance(value, (list, tuple)) and value:
            ok = all(isinstance(v, str) and v and v != NORMRATIO and v not in _WILDCARDS for v in value)
            if ok and len(set(value)) == len(value):
                return
        raise ConfigError(
            f"hyperparameter {name}={value!r} must be 'penultimate', 'normratio', a block name (see "
            "normscore.get_adapter(model).block_names), the wildcards '*stages' (last block of every stage) or "
            "'*' (every block), or a non-empty list of distinct block names ('penultimate' may be one of them)."
        )


LAYER_CONSTRAINTS: dict[str, Constraint] = {"layer": _Layer(), "layer_aggregation": OneOf(AGGREGATIONS)}

#: the methods a ``layer_aggregation="sum"`` detector dispatches to its per-block members
_DISPATCHED = ("_fit_begin", "_fit_update", "_fit_end", "score_features")


def normratio_select(stream: FitStream, *, grid: int = 3, seed: int = 0) -> tuple[str, list[dict[str, Any]]]:
    """The block FeatureNorm's jigsaw NormRatio selects on the fit split of ``stream`` and the
    per-block table (``block``, ``norm_ratio``, ``mean_id_norm``, ``mean_jigsaw_norm``): one pass,
    :class:`~normscore.detectors.featurenorm.FeatureNorm`'s streamed fit itself."""
    from .featurenorm import FeatureNorm

    fn = FeatureNorm(grid=grid, seed=seed)
    adapter = stream.adapter
    fn._fit_begin(adapter)
    for feats in stream.features(fn.capture_spec(adapter, "fit")):
        fn._fit_update(feats)
    sync_state(fn)
    fn._fit_end()
    return fn.block_, fn.block_report_


class LayerFeatures:
    """Mixin of the detectors that read pooled features: the ``layer=`` hyperparameter.

    A subclass takes ``layer: str | list[str] = "penultimate"`` (and, unless it declares
    :attr:`layer_needs_head`, ``layer_aggregation: str = "concat"``) in its constructor, stores
    them as attributes, builds its capture spec with :meth:`layer_spec` and reads ``h`` with
    :meth:`layer_features`. Everything else (constraints, the NormRatio pass, ``layer_``, the
    per-block members of ``layer_aggregation="sum"`` and their persistence) lives here.
    """

    #: why the detector's formula cannot work at another layer than the head's input ("" = it can)
    layer_needs_head: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = inspect.signature(cls.__init__).parameters
        if "layer" in params:
            extra = {k: c for k, c in LAYER_CONSTRAINTS.items() if k in params}
            cls.constraints = {**cls.constraints, **extra}  # type: ignore[attr-defined]
        for meth in _DISPATCHED:
            fn = cls.__dict__.get(meth)
            if fn is not None and not getattr(fn, "_layer_dispatch", False):
                setattr(cls, meth, _dispatching(meth, fn))

    # ------------------------------------------------------------------ the hyperparameters
    def _layer_param(self) -> str | list[str]:
        v = getattr(self, "layer", PENULTIMATE)
        return list(v) if isinstance(v, (list, tuple)) else v

    def _has_layer_param(self) -> bool:
        return "layer" in self.hyperparameter_names()  # type: ignore[attr-defined]

    def _check_params(self) -> None:
        super()._check_params()  # type: ignore[misc]
        layer = self._layer_param()
        if self.layer_needs_head and layer != PENULTIMATE:
            raise ConfigError(
                f"{self.name}: layer={layer!r} is not available: {self.layer_needs_head} "  # type: ignore[attr-defined]
                "Use layer='penultimate', or a detector without the head at a block (e.g. mahalanobis, knn)."
            )
        # a detector that fits the block choice itself needs its own passes (NormRatio, then the fit)
        if layer == NORMRATIO:
            self.__dict__["fit_mode"] = "multi_pass"
        else:
            self.__dict__.pop("fit_mode", None)

    # ------------------------------------------------------------------ which blocks
    def _layer_names(self, adapter: Any = None) -> str | list[str]:
        """The resolved layer: ``"penultimate"``, a block name, or a list of names (wildcards
        expanded with ``adapter``, or kept for :func:`~normscore.taps.capture` to expand)."""
        fitted = getattr(self, "layer_", None)
        if fitted is not None:
            self._check_layer_unchanged()
            return list(fitted) if isinstance(fitted, (list, tuple)) else fitted
        layer = self._layer_param()
        if layer == NORMRATIO:
            raise NotFittedError(
                f"{self.name}: layer='normratio' selects its block during fit(model, id_loader) (a NormRatio pass "  # type: ignore[attr-defined]
                "over the model); it is not fitted yet, and cannot be fitted from cached features."
            )
        if layer in _WILDCARDS:
            if adapter is None:
                adapter = getattr(self, "_adapter", None)
            if adapter is not None and adapter.resolved:
                names = [n for n, _ in expand_blocks(adapter, [(layer, _RED)])]
                return names[0] if len(names) == 1 else names
            return [layer]  # expanded by the capture
        if isinstance(layer, list) and len(layer) == 1:
            return layer[0]
        return layer

    def _layer_choice(self) -> list:
        """The layer hyperparameters as fitted (``layer_fit_params_``)."""
        return [self._layer_param(), getattr(self, "layer_aggregation", "concat")]

    def _check_layer_unchanged(self) -> None:
        was = getattr(self, "layer_fit_params_", None)
        if was is not None and list(was) != self._layer_choice():
            raise ConfigError(
                f"{self.name}: layer/layer_aggregation were changed to {self._layer_choice()} after fitting with "  # type: ignore[attr-defined]
                f"{list(was)}; the fitted statistics belong to the old layer. Refit the detector."
            )

    def _layer_members_mode(self) -> bool:
        """Whether the detector is a sum of per-block detectors (``layer_aggregation="sum"`` with a
        list of blocks or a wildcard; decided by the hyperparameters alone)."""
        if getattr(self, "layer_aggregation", "concat") != "sum":
            return False
        layer = self._layer_param()
        return (isinstance(layer, list) and len(layer) > 1) or layer in _WILDCARDS

    def layer_spec(self, adapter: Any, *, logits: bool) -> CaptureSpec:
        """The capture spec of the chosen layer(s), with ``logits`` if the detector needs them."""
        names = self._layer_names(adapter)
        names = names if isinstance(names, list) else [names]
        if adapter is not None and adapter.resolved:
            for n in names:
                if n != PENULTIMATE and n not in _WILDCARDS:
                    try:
                        adapter.block(n)
                    except AdapterError as e:
                        raise ConfigError(f"{self.name}: layer={self._layer_param()!r}: {e}") from None  # type: ignore[attr-defined]
        blocks = frozenset((n, _RED) for n in names if n != PENULTIMATE)
        return CaptureSpec(logits=logits, penultimate=PENULTIMATE in names, blocks=blocks)

    def layer_features(self, feats: Features) -> torch.Tensor:
        """The feature matrix ``h [B, D]`` of the chosen layer(s): the penultimate features, a
        block's pooled output, or the concatenation of several."""
        names = self._layer_names()
        if not isinstance(names, list):
            return feats.require(_key(names))
        if len(names) == 1 and names[0] in _WILDCARDS:
            raise NotFittedError(f"{self.name}: layer={names[0]!r} is resolved on the first fit batch.")  # type: ignore[attr-defined]
        return torch.cat([feats.require(_key(n)).float() for n in names], dim=1)

    # ------------------------------------------------------------------ the NormRatio pass
    def _fit_prepass(self, stream: FitStream) -> None:
        super()._fit_prepass(stream)  # type: ignore[misc]
        if self._layer_param() == NORMRATIO:
            self.layer_, self.layer_table_ = normratio_select(stream)
            self.layer_fit_params_ = self._layer_choice()

    # ------------------------------------------------------------------ sum: per-block members
    def _member(self, name: str) -> Any:
        params = {**self.get_params(), "layer": name, "layer_aggregation": "concat"}  # type: ignore[attr-defined]
        m = type(self)(**params)
        if getattr(self, "_model", None) is not None:
            m._model, m._adapter = self._model, self._adapter  # type: ignore[attr-defined]
        return m

    def _members_begin(self, adapter: Any) -> None:
        self._layer_adapter = adapter
        self._layer_members: list[Any] | None = None
        self.__dict__.pop("_fit_state", None)
        self.__dict__.pop("_fit_order", None)

    def _members_update(self, feats: Features) -> None:
        if self._layer_members is None:
            names = self._layer_names(self._layer_adapter)
            assert isinstance(names, list)
            self.layer_ = names
            self.layer_fit_params_ = self._layer_choice()
            self._layer_members = [self._member(n) for n in names]
            for m in self._layer_members:
                m._fit_begin(self._layer_adapter)
            # the members' accumulators are this detector's fit state (synchronised by the base)
            for i, m in enumerate(self._layer_members):
                setattr(self, f"_layer_m{i}", m)
            self.__dict__["_fit_state"] = tuple((f"_layer_m{i}", "merge") for i in range(len(self._layer_members)))
            self.__dict__["_fit_order"] = None
        for m in self._layer_members:
            m._fit_update(feats)

    def _members_end(self) -> None:
        members = self._layer_members
        for i in range(len(members or [])):
            delattr(self, f"_layer_m{i}")
        self.__dict__.pop("_fit_state", None)
        self.__dict__.pop("_fit_order", None)
        del self._layer_adapter
        if not members:
            raise InputError(f"{self.name} saw no fit samples.")  # type: ignore[attr-defined]
        for m in members:
            m._fit_end()

    def _members_score(self, feats: Features) -> torch.Tensor:
        members = getattr(self, "_layer_members", None)
        if not members:
            raise NotFittedError(f"{self.name} is not fitted yet. Call det.fit(model, id_loader) first.")  # type: ignore[attr-defined]
        self._check_feature_shapes(feats)  # type: ignore[attr-defined]
        total = None
        for m in members:
            s = m.score_features(feats).double()
            total = s if total is None else total + s
        assert total is not None
        return total.float()

    # ------------------------------------------------------------------ persistence and devices
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        members = getattr(self, "_layer_members", None)
        if members and self.is_fitted:  # type: ignore[attr-defined]
            sd["fitted"]["layer_members_"] = [m.state_dict() for m in members]
        return sd

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        state = dict(state)
        fitted = dict(state.get("fitted", {}))
        members_state = fitted.pop("layer_members_", None)
        state["fitted"] = fitted
        super().load_state_dict(state, strict=strict)  # type: ignore[misc]
        self._layer_members = None
        if members_state:
            members = []
            for s in members_state:  # members load unbound: this detector's fingerprint was checked
                m = type(self)(**{**self.get_params(), "layer": s["params"]["layer"], "layer_aggregation": "concat"})  # type: ignore[attr-defined]
                m.load_state_dict(s)
                members.append(m)
            self._layer_members = members
            if getattr(self, "_model", None) is not None:
                self.to(model_device(self._model))  # type: ignore[attr-defined]

    def to(self, device: torch.device | str) -> Any:
        out = super().to(device)  # type: ignore[misc]
        for m in getattr(self, "_layer_members", None) or []:
            m.to(device)
        return out

    def _reset_fitted(self) -> None:
        super()._reset_fitted()  # type: ignore[misc]
        self._layer_members = None


def _key(name: str) -> str:
    return PENULTIMATE if name == PENULTIMATE else block_key(name, _RED)


def _dispatching(meth: str, fn: Any) -> Any:
    """``fn`` that, for a ``layer_aggregation="sum"`` detector, runs the per-block members instead
    (and records ``layer_`` after a plain fit)."""
    members_fn = {
        "_fit_begin": "_members_begin",
        "_fit_update": "_members_update",
        "_fit_end": "_members_end",
        "score_features": "_members_score",
    }[meth]

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any) -> Any:
        if self._layer_members_mode():
            return getattr(self, members_fn)(*args)
        out = fn(self, *args)
        if meth == "_fit_end" and self._has_layer_param() and getattr(self, "layer_", None) is None:
            self.layer_ = self._layer_names(getattr(self, "_adapter", None))
            self.layer_fit_params_ = self._layer_choice()
        return out

    wrapper._layer_dispatch = True  # type: ignore[attr-defined]
    if getattr(fn, "_checks_shapes", False):
        wrapper._checks_shapes = True  # type: ignore[attr-defined]
    return wrapper
