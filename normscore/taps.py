"""How tensors are captured: hooks registered for one call, per-call storage, model hygiene.

:func:`capture` runs the model once on a batch and returns a :class:`Features` bundle holding
exactly what a :class:`CaptureSpec` asks for: logits, penultimate features, per-block outputs
(raw or reduced inside the hook, so large feature maps are never kept), the input, and
optionally the results of one batched backward pass (input gradients and per-layer callbacks
that see each layer's input and output gradient).

Guarantees (tested):

* hooks are registered for the call and removed on exit, also when the call raises;
* the model runs in eval mode during the call, and every module's ``training`` flag is restored
  afterwards (reference-counted, so concurrent calls on one model are safe);
* no parameter, buffer, ``requires_grad`` flag or ``.grad`` is changed: backward passes use
  ``torch.autograd.grad`` with respect to the (copied) input, never ``.backward()``;
* storage is per call: hooks only record for the call (thread / context) that registered them,
  so several threads can capture through one model at once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter, BlockInfo, model_failure, model_output_tensor
from .errors import AdapterError, InputError, InputTypeError
from .runmode import eval_mode, model_device, model_dtype

__all__ = [
    "ALL_BLOCKS",
    "STAGE_ENDS",
    "BackwardSpec",
    "CaptureSpec",
    "FeatureKey",
    "Features",
    "block_key",
    "capture",
    "expand_blocks",
    "feature_kind",
    "feature_shape",
    "get_view",
    "override",
    "parse_key",
    "penultimate_with_grad",
    "prepare_input",
    "reduce_block",
    "reduction_names",
    "register_reduction",
    "register_view",
    "spec_keys",
    "view_key",
]

# ---------------------------------------------------------------------------------------------
# what to capture


@dataclass(frozen=True)
class BackwardSpec:
    """One batched backward pass.

    ``objective(logits) -> [B]`` must be a per-sample scalar (eval mode makes samples
    independent, so the gradient of the sum gives exact per-sample gradients).
    ``layers`` maps a module name to a callback ``fn(module, layer_input, grad_output) ->
    dict[str, Tensor]`` of per-sample tensors; results with the same key are summed over
    layers. ``input_grad`` also stores the gradient with respect to the input. ``on`` says what
    the objective receives: ``"logits"`` (the model output) or ``"penultimate"`` (the head's
    input ``[B, D]``, still attached to the graph: objectives on the features, e.g. a
    Mahalanobis distance).
    """

    objective: Callable[[torch.Tensor], torch.Tensor]
    layers: Mapping[str, Callable] = field(default_factory=dict)
    input_grad: bool = False
    key: str = "default"  # identifies the objective when specs are merged
    on: str = "logits"


#: block name that stands for every candidate block of the adapter (expanded in :func:`capture`,
#: so a spec can ask for all blocks before the adapter has seen an input)
ALL_BLOCKS = "*"
#: block name that stands for the last candidate block of every stage
#: (:attr:`~normscore.adapters.Adapter.stage_ends`), expanded like :data:`ALL_BLOCKS`
STAGE_ENDS = "*stages"


@dataclass(frozen=True)
class CaptureSpec:
    """What one model pass must capture. Specs of several detectors merge with ``|``.

    ``blocks`` holds ``(block name, reduction)`` pairs; the name :data:`ALL_BLOCKS` (``"*"``)
    means every candidate block of the adapter.
    """

    logits: bool = True
    penultimate: bool = False
    blocks: frozenset[tuple[str, str]] = frozenset()  # (block name, reduction)
    input: bool = False
    backward: BackwardSpec | None = None
    views: frozenset[str] = frozenset()  # registered input views captured in the same pass

    def __or__(self, other: CaptureSpec) -> CaptureSpec:
        if self.backward is not None and other.backward is not None and self.backward is not other.backward:
            raise ValueError("two different backward passes cannot share one capture")
        return CaptureSpec(
            logits=self.logits or other.logits,
            penultimate=self.penultimate or other.penultimate,
            blocks=self.blocks | other.blocks,
            input=self.input or other.input,
            backward=self.backward or other.backward,
            views=self.views | other.views,
        )

    @property
    def needs_head(self) -> bool:
        return self.penultimate


class Features(dict):
    """A bundle of captured per-sample tensors, keyed by kind. All tensors are batch-first.

    Keys: ``"logits"`` [B, C], ``"penultimate"`` [B, D], ``"block:<name>:<reduction>"``,
    ``"input"``, ``"input_grad"``, ``"labels"`` and detector-defined keys from backward
    callbacks.
    """

    @property
    def batch_size(self) -> int:
        for v in self.values():
            return int(v.shape[0])
        return 0

    def select(self, index: torch.Tensor | slice) -> Features:
        return Features({k: v[index] for k, v in self.items()})

    def to(self, device: torch.device | str) -> Features:
        return Features({k: v.to(device) for k, v in self.items()})

    def subset(self, keys: Iterable[str]) -> Features:
        return Features({k: self[k] for k in keys if k in self})

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        parts = [p for p in parts if p]
        if not parts:
            return Features()
        keys = parts[0].keys()
        return Features({k: torch.cat([p[k] for p in parts]) for k in keys})

    def require(self, key: str) -> torch.Tensor:
        try:
            return self[key]
        except KeyError:
            raise KeyError(
                f"feature {key!r} was not captured (available: {sorted(self)}); the capture spec "
                "of this detector does not match the features given"
            ) from None


# ---------------------------------------------------------------------------------------------
# feature keys: taps build and parse every key (nobody else knows the format)

_BLOCK = "block:"
_VIEW_SEP = "|"


def block_key(name: str, reduction: str) -> str:
    """The key of block ``name``'s output reduced with ``reduction``: ``"block:<name>:<reduction>"``."""
    return f"{_BLOCK}{name}:{reduction}"


def view_key(view: str, key: str) -> str:
    """The key of feature ``key`` captured on input view ``view``: ``"<view>|<key>"``."""
    return f"{view}{_VIEW_SEP}{key}"


@dataclass(frozen=True)
class FeatureKey:
    """A parsed feature key (:func:`parse_key`).

    ``base`` is the key without its input view; ``view`` the view's name (``None`` on the
    plain input); ``block`` and ``reduction`` are set for block keys only.
    """

    base: str
    view: str | None = None
    block: str | None = None
    reduction: str | None = None

    @property
    def kind(self) -> str | None:
        """``"logits"``, ``"penultimate"`` or ``"blocks"`` for a standard key, else ``None``."""
        if self.base in ("logits", "penultimate"):
            return self.base
        return "blocks" if self.block is not None else None


def parse_key(key: str) -> FeatureKey:
    """Split a feature key into its view, base key, block name and reduction."""
    view, sep, base = key.partition(_VIEW_SEP)
    if not sep:
        view, base = None, key  # type: ignore[assignment]
    if base.startswith(_BLOCK):
        name, _, red = base[len(_BLOCK) :].rpartition(":")
        return FeatureKey(base, view, name, red)
    return FeatureKey(base, view)


# ---------------------------------------------------------------------------------------------
# block reductions (computed inside the forward hook)


def _spatial_view(t: torch.Tensor, info: BlockInfo) -> torch.Tensor:
    """Return the block output as ``[B, C, S]`` (channels x positions/tokens)."""
    if info.layout == "nchw":
        return t.flatten(2)
    if info.layout == "nhwc":
        return t.flatten(1, 2).transpose(1, 2)
    if info.layout == "tokens":
        return t[:, info.prefix_tokens :].transpose(1, 2)
    raise ValueError(f"unknown layout {info.layout}")


Reduction = Callable[[torch.Tensor], torch.Tensor]
_REDUCTIONS: dict[str, Reduction] = {}


def register_reduction(name: str, fn: Reduction) -> None:
    """Register a block reduction ``fn(v [B, C, S] float) -> [B, ...]``, computed inside the
    forward hook on the block output seen as channels x positions (patch tokens for token
    layouts, class/register tokens excluded). ``"raw"`` (the output itself) is built in."""
    if name == "raw" or ":" in name or _VIEW_SEP in name:
        raise ValueError(f"invalid reduction name {name!r} (reserved, or contains ':' or '|')")
    _REDUCTIONS[name] = fn


def reduction_names() -> list[str]:
    """The registered block reductions (and ``"raw"``)."""
    return ["raw", *sorted(_REDUCTIONS)]


def reduce_block(t: torch.Tensor, info: BlockInfo, reduction: str) -> torch.Tensor:
    """Reduce one block output with a registered reduction.

    * ``"gap"`` - mean over positions (patch tokens), ``[B, C]``.
    * ``"raw"`` - the output itself.
    * others registered with :func:`register_reduction` (e.g. ``"featurenorm"``, registered by
      :mod:`normscore.detectors.featurenorm`).
    """
    if reduction == "raw":
        return t
    fn = _REDUCTIONS.get(reduction)
    if fn is None:
        raise ValueError(f"unknown block reduction {reduction!r}")
    return fn(_spatial_view(t, info).float())


register_reduction("gap", lambda v: v.mean(dim=2))


# ---------------------------------------------------------------------------------------------
# input views: transformed copies of the batch captured in the same forward pass

ViewFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_VIEWS: dict[str, ViewFn] = {}


def register_view(name: str, fn: ViewFn) -> None:
    """Register an input view ``fn(x [B, C, H, W], index [B]) -> x' [B, C, H, W]``.

    ``index`` holds the global position of each sample in the fit stream, so views that
    draw random numbers can seed them per sample and stay independent of the batch size.
    Captured view features are stored under ``"<view>|<key>"``.
    """
    if _VIEW_SEP in name:
        raise ValueError("view names cannot contain '|'")
    _VIEWS[name] = fn


def get_view(name: str) -> ViewFn | None:
    """The registered input view ``name`` (``None`` if there is none)."""
    return _VIEWS.get(name)


# ---------------------------------------------------------------------------------------------
# input handling

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the first ``nn.Conv2d`` in registration order (the stem, for the
    common architectures), known without running the model; ``None`` without one."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


_TRANSFORM_HINT = (
    "Raw images need the model's own preprocessing (resize, crop, normalisation): "
    "tf = normscore.input_transform(model); x = torch.stack([tf(img) for img in images])."
)


def _is_pil(x: object) -> bool:
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(x).__mro__)


def _not_a_tensor(x: object) -> str:
    """The message for a non-tensor input: PIL images and numpy arrays get the preprocessing hint."""
    head = "expected a torch.Tensor batch of images [B, C, H, W], got"
    if _is_pil(x):
        return f"{head} a PIL image. {_TRANSFORM_HINT}"
    if isinstance(x, (list, tuple)) and x and all(_is_pil(v) for v in x):
        return f"{head} a {type(x).__name__} of {len(x)} PIL images. {_TRANSFORM_HINT}"
    if type(x).__module__ == "numpy" and hasattr(x, "shape"):
        return (
            f"{head} a numpy array {getattr(x, 'dtype', '')} {tuple(x.shape)}. If it is a preprocessed "  # type: ignore[attr-defined]
            f"batch [B, C, H, W], use torch.from_numpy(x). {_TRANSFORM_HINT}"
        )
    return (
        f"{head} {type(x).__name__}. Convert with torch.as_tensor(...) (and batch it) first; for raw "
        "images use the model's preprocessing: normscore.input_transform(model)."
    )


def prepare_input(x: object, adapter: Adapter | None, model: nn.Module) -> torch.Tensor:
    """Validate a batch of images and move it to the model's device and dtype."""
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(_not_a_tensor(x))
    if x.dtype not in _FLOATS:
        raise InputTypeError(
            f"the input has dtype {x.dtype}; the model needs floating-point images. Convert and "
            "normalise them as for the model (e.g. x.float() / 255 followed by the model's "
            "normalisation)."
        )
    if x.ndim == 3:
        raise InputError(
            f"the input has 3 dimensions {tuple(x.shape)}; expected a batch [B, C, H, W]. "
            "For a single image use x.unsqueeze(0)."
        )
    if x.ndim != 4:
        raise InputError(f"the input has shape {tuple(x.shape)}; expected a batch of images [B, C, H, W].")
    if x.shape[0] == 0:
        raise InputError("the input batch is empty (batch size 0).")
    known = adapter is not None and adapter.resolved
    # before the probe has run, the first registered convolution stands in for the first one
    # run; an image channel count (<= 4) in dim 1 is then trusted over it
    chans = adapter.in_chans if known else first_conv_channels(model)  # type: ignore[union-attr]
    if chans is not None and x.shape[1] != chans and x.shape[3] == chans and (known or x.shape[1] > 4):
        raise InputError(
            f"the input of shape {tuple(x.shape)} looks channels-last [B, H, W, C]; the model expects "
            f"channels-first [B, C, H, W] with C = {chans}. Use x.permute(0, 3, 1, 2) (for numpy/PIL "
            "images, normscore.input_transform(model) builds the model's preprocessing)."
        )
    if known and chans is not None and x.shape[1] != chans:
        raise InputError(
            f"the input has {x.shape[1]} channels but the model's first convolution expects "
            f"{chans}. Convert the images (e.g. grayscale -> x.expand(-1, 3, -1, -1)) "
            "or use a model with the matching number of input channels."
        )
    dev = model_device(model)
    if x.device != dev:
        if x.device.type == "cpu":
            x = x.to(dev, non_blocking=True)
        else:
            raise InputError(
                f"the input is on {x.device} but the model is on {dev}. Move one of them: "
                f"x.to({str(dev)!r}) or model.to({str(x.device)!r})."
            )
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten().tolist()
        raise InputError(
            f"the input contains NaN or Inf values (samples {bad[:10]}{'...' if len(bad) > 10 else ''}). "
            "normscore rejects non-finite inputs instead of returning meaningless scores; fix or "
            "drop those samples."
        )
    dt = model_dtype(model)
    if x.dtype != dt:
        x = x.to(dt)
    return x


# ---------------------------------------------------------------------------------------------
# the capture itself

_ACTIVE: contextvars.ContextVar[object | None] = contextvars.ContextVar("normscore_active_call", default=None)


class _Call:
    """Per-call storage. Hooks compare the context's active call with their own."""

    __slots__ = ("__weakref__", "store")

    def __init__(self) -> None:
        self.store: dict[str, torch.Tensor] = {}


def capture(
    adapter: Adapter,
    x: torch.Tensor,
    spec: CaptureSpec,
    *,
    validated: bool = False,
    index: torch.Tensor | None = None,
) -> Features:
    """Run the model once on ``x`` and return the features ``spec`` asks for.

    ``x`` is validated and moved to the model's device/dtype unless ``validated`` is true.
    With ``spec.views``, the transformed copies are concatenated to the batch (one forward
    pass) and their features returned under ``"<view>|<key>"``; ``index`` (global sample
    positions, default ``arange(B)``) is passed to the view functions.
    """
    model = adapter.model
    if not validated:
        x = prepare_input(x, adapter, model)
    adapter.ensure_resolved(x)
    if not validated and adapter.in_chans is not None and x.shape[1] != adapter.in_chans:
        prepare_input(x, adapter, model)  # raises the channel error now that the adapter knows
    if spec.views:
        if spec.backward is not None:
            raise ValueError("input views cannot be combined with a backward pass")
        views = sorted(spec.views)
        for v in views:
            if v not in _VIEWS:
                raise ValueError(f"unknown input view {v!r}; registered: {sorted(_VIEWS)}")
        idx = index if index is not None else torch.arange(x.shape[0])
        batch = torch.cat([x] + [_VIEWS[v](x, idx).to(x.dtype) for v in views])
        inner = CaptureSpec(spec.logits, spec.penultimate, spec.blocks, spec.input, None)
        allf = capture(adapter, batch, inner, validated=True)
        b = x.shape[0]
        out = Features({k: t[:b] for k, t in allf.items()})
        for i, v in enumerate(views, start=1):
            for k, t in allf.items():
                out[view_key(v, k)] = t[i * b : (i + 1) * b]
        return out
    call = _Call()
    handles: list = []
    store = call.store
    bw = spec.backward
    need_grad = bw is not None

    grad_on_head = bw is not None and bw.on == "penultimate"
    if bw is not None and bw.on not in ("logits", "penultimate"):
        raise ValueError(f"BackwardSpec.on must be 'logits' or 'penultimate', got {bw.on!r}")
    head_name = adapter.head_name if spec.needs_head or grad_on_head else None
    block_pairs = expand_blocks(adapter, spec.blocks)
    blocks_by_name: dict[str, list[str]] = {}
    for name, red in block_pairs:
        blocks_by_name.setdefault(name, []).append(red)
    infos = {name: adapter.block(name) for name in blocks_by_name}

    def owner() -> bool:
        return _ACTIVE.get() is call

    try:
        if head_name is not None:

            def head_pre(module: nn.Module, args: tuple) -> None:
                if owner():
                    store["penultimate"] = args[0].flatten(1)

            handles.append(adapter.module(head_name).register_forward_pre_hook(head_pre))

        for name, reds in blocks_by_name.items():
            info = infos[name]

            def block_hook(module, args, out, _name=name, _reds=tuple(reds), _info=info):
                if not owner():
                    return
                if not isinstance(out, torch.Tensor):
                    raise AdapterError(f"block {_name!r} returned {type(out).__name__}, not a tensor")
                for r in _reds:
                    t = reduce_block(out, _info, r)
                    store[block_key(_name, r)] = t

            handles.append(adapter.module(name).register_forward_hook(block_hook))

        if bw is not None:
            for name, fn in bw.layers.items():

                def layer_hook(module, args, out, _name=name, _fn=fn):
                    if not owner() or not isinstance(out, torch.Tensor) or not out.requires_grad:
                        return
                    inp = _first_tensor(args)

                    def grad_hook(g, _name=_name, _fn=_fn, _module=module, _inp=inp):
                        res = _fn(_module, _inp, g)
                        for k, v in res.items():
                            prev = store.get(k)
                            store[k] = v if prev is None else prev + v

                    out.register_hook(grad_hook)

                handles.append(adapter.module(name).register_forward_hook(layer_hook))

        token = _ACTIVE.set(call)
        try:
            with eval_mode(model):
                if need_grad:
                    xin = x.detach().requires_grad_(True)
                    with torch.enable_grad():
                        out = _forward(model, xin)
                        if grad_on_head and "penultimate" not in store:
                            raise AdapterError(f"the head {head_name!r} did not run during the forward pass")
                        obj = bw.objective(store["penultimate"] if grad_on_head else out)
                        if obj.ndim != 1 or obj.shape[0] != x.shape[0]:
                            raise ValueError("backward objective must return one scalar per sample")
                        (gx,) = torch.autograd.grad(obj.sum(), xin)
                    if bw.input_grad:
                        store["input_grad"] = gx.detach()
                else:
                    with torch.no_grad():
                        out = _forward(model, x)
        finally:
            _ACTIVE.reset(token)
    finally:
        for h in handles:
            h.remove()

    feats = Features()
    if spec.logits:
        feats["logits"] = out.detach().float()
    if spec.penultimate:
        if "penultimate" not in store:
            raise AdapterError(f"the head {head_name!r} did not run during the forward pass")
        feats["penultimate"] = store.pop("penultimate").detach().float()
    else:
        store.pop("penultimate", None)  # captured only for a backward objective on the features
    for name, red in block_pairs:
        k = block_key(name, red)
        if k not in store:
            raise AdapterError(f"block {name!r} did not run during the forward pass")
        feats[k] = store.pop(k).detach()
    for k, v in store.items():
        feats[k] = v.detach()
    if spec.input:
        feats["input"] = x.detach()
    return feats


def expand_blocks(adapter: Adapter, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(block name, reduction)`` pairs with the wildcards :data:`ALL_BLOCKS` and
    :data:`STAGE_ENDS` expanded to block names (needs a resolved adapter for them)."""
    out: list[tuple[str, str]] = []
    for name, red in pairs:
        if name == ALL_BLOCKS:
            names = adapter.block_names
        elif name == STAGE_ENDS:
            names = adapter.stage_ends
        else:
            names = [name]
        out.extend((n, red) for n in names if (n, red) not in out)
    return out


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


# ---------------------------------------------------------------------------------------------
# feature keys: what a spec yields on a model, and the per-sample shape of each key


def spec_keys(adapter: Adapter, spec: CaptureSpec) -> list[str]:
    """The standard feature keys :func:`capture` returns for ``spec`` on ``adapter``'s model
    (logits, penultimate, blocks and their input views; not ``"input"`` and not keys that
    backward callbacks define). Needs a resolved adapter when ``spec`` asks for all blocks."""
    keys = (["logits"] if spec.logits else []) + (["penultimate"] if spec.penultimate else [])
    keys += [block_key(n, r) for n, r in sorted(expand_blocks(adapter, spec.blocks))]
    return keys + [view_key(v, k) for v in sorted(spec.views) for k in keys]


def feature_kind(key: str) -> str | None:
    """``"logits"``, ``"penultimate"`` or ``"blocks"`` for a standard key (of any input view),
    else ``None``."""
    return parse_key(key).kind


def feature_shape(adapter: Adapter, key: str) -> tuple[int, ...] | None:
    """Per-sample shape of the standard feature ``key`` on ``adapter``'s (resolved) model;
    ``None`` when the model has no such feature (no linear head, no such block)."""
    k = parse_key(key)
    if k.base == "logits":
        return None if adapter.num_classes is None else (int(adapter.num_classes),)
    if k.base == "penultimate":
        return (adapter.num_features,) if adapter.has_head else None
    if k.block is not None and k.reduction is not None:
        if k.block not in adapter.block_names:
            return None
        info = adapter.block(k.block)
        out = reduce_block(torch.empty((1, *info.shape), device="meta"), info, k.reduction)
        return tuple(int(d) for d in out.shape[1:])
    return None


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    try:
        out = model(x)
    except (InputError, AdapterError):
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with context at the API boundary
        raise model_failure(model, x, e) from e
    return model_output_tensor(out)


@contextlib.contextmanager
def penultimate_with_grad(head: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of ``head`` (the adapter's linear head, flattened to ``[B, D]``) on
    every forward, **with** its autograd graph, under key ``"z"``; the hook is removed on exit
    (also on exceptions).

    For training loops (:mod:`normscore.finetune`): unlike :func:`capture` (eval mode, no grad,
    for scoring), it leaves the model's mode alone and keeps the graph.
    """
    store: dict[str, torch.Tensor] = {}

    def pre(module: nn.Module, args: tuple) -> None:
        store["z"] = args[0].flatten(1)

    handle = head.register_forward_pre_hook(pre)
    try:
        yield store
    finally:
        handle.remove()


_OVERRIDE: contextvars.ContextVar[object | None] = contextvars.ContextVar("normscore_override", default=None)

OutputFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
InputFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def override(
    adapter: Adapter,
    outputs: Mapping[str, OutputFn] | None = None,
    inputs: Mapping[str, InputFn] | None = None,
) -> Iterator[None]:
    """Change a module's output (or input) inside one call, without changing the model.

    Within the ``with`` block, module ``name``'s output ``out`` is replaced by
    ``outputs[name](module, out)`` and its first positional input ``x`` by
    ``inputs[name](module, x)``, for calls made from this context (thread / task) only, so
    other calls through the same model at the same time are unaffected. For detectors that
    re-run the rest of the network on a modified intermediate tensor (RankFeat's rank-1
    removal, Monte-Carlo dropout's masks); use it around :func:`capture`, which puts the model
    in eval mode and restores every flag. The hooks are removed on exit, also when the call
    raises."""
    token = object()
    handles = []

    def mine() -> bool:
        return _OVERRIDE.get() is token

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
        reset = _OVERRIDE.set(token)
        try:
            yield
        finally:
            _OVERRIDE.reset(reset)
    finally:
        for h in handles:
            h.remove()
