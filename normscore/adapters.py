"""Where things are in a model: the head, the penultimate features, the logits and the blocks.

An :class:`Adapter` answers, for any ``nn.Module`` classifier and without editing it:

* **head** - the final linear layer whose output *is* the model's logits (``nn.Linear`` or a
  1x1 ``nn.Conv2d`` applied to a pooled ``[B, D, 1, 1]`` tensor). Its weight and bias are
  ``W`` (``[C, D]``) and ``b`` (``[C]``).
* **penultimate** - the pooled pre-logit features: the input of the head, flattened to
  ``[B, D]``. For timm models this equals ``forward_head(x, pre_logits=True)``.
* **logits** - the model output.
* **blocks** - the ordered candidate blocks (residual, stage or transformer blocks) whose
  outputs are feature maps ``[B, C, H, W]`` (``"nchw"``), channels-last maps ``[B, H, W, C]``
  (``"nhwc"``, Swin) or tokens ``[B, N, D]`` (``"tokens"``, ViT/Mixer; the first
  ``prefix_tokens`` tokens are class/register tokens).

Resolution happens in two steps. The *static* step looks for the head by name (timm's
``get_classifier()``, torchvision's ``fc``, ``classifier[-1]``, ``heads.head``, ``head``) and
for blocks by class name (a table of the block classes of timm and torchvision families).
The *probe* step runs the model once on one real sample (eval mode, no grad, on the first
batch the adapter sees) to order the blocks by execution, read their output layouts, and check
that the head's output really is the model output. A model whose logits are not a linear
function of pooled features (e.g. squeezenet's conv classifier followed by ReLU and pooling)
has no head: logit-only detectors still work on it, while detectors that need the head or the
penultimate features raise :class:`~normscore.errors.AdapterError` saying so.

Everything can be overridden by module name: ``Adapter(model, head="fc", blocks=[...])``.
Adapters are cached per model (:func:`get_adapter`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import AdapterError, InputError, did_you_mean
from .runmode import eval_mode

__all__ = ["Adapter", "BlockInfo", "get_adapter", "set_adapter"]

#: Block classes of timm and torchvision model families, matched by class name. When one
#: matched module contains another, the outer one is the block.
KNOWN_BLOCK_CLASSES: frozenset[str] = frozenset(
    {
        # ResNet / ResNeXt / Wide-ResNet / RegNet (timm + torchvision), timm byobnet
        "BasicBlock",
        "Bottleneck",
        "BottleneckBlock",
        "ResBottleneckBlock",
        "PreActBasicBlock",
        "PreActBottleneck",
        # MobileNet / EfficientNet / ShuffleNet (timm + torchvision)
        "InvertedResidual",
        "_InvertedResidual",
        "DepthwiseSeparableConv",
        "EdgeResidual",
        "UniversalInvertedResidual",
        "CondConvResidual",
        "MBConv",
        "FusedMBConv",
        # ConvNeXt
        "ConvNeXtBlock",
        "CNBlock",
        # DenseNet: dense blocks and transitions (dense *layers* output only new channels)
        "DenseBlock",
        "DenseTransition",
        "_DenseBlock",
        "_Transition",
        # Inception / GoogLeNet
        "InceptionA",
        "InceptionB",
        "InceptionC",
        "InceptionD",
        "InceptionE",
        "Inception",
        # Transformers and MLPs
        "Block",
        "EncoderBlock",
        "SwinTransformerBlock",
        "SwinTransformerBlockV2",
        "MixerBlock",
        "ResBlock",
        "SpatialGatingBlock",
        # MaxViT (torchvision layer = MBConv + block attention + grid attention; timm blocks)
        "MaxVitLayer",
        "MaxxVitBlock",
        "ParallelMaxxVitBlock",
        "MbConvBlock",
        "TransformerBlock2d",
    }
)

#: Block classes whose 4-D outputs are channels-last ``[B, H, W, C]``.
NHWC_BLOCK_CLASSES: frozenset[str] = frozenset(
    {"SwinTransformerBlock", "SwinTransformerBlockV2", "PatchMerging", "PatchMergingV2"}
)

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.ELU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class BlockInfo:
    """One candidate block: its module name, output layout and number of prefix tokens."""

    name: str
    layout: str  # "nchw" | "nhwc" | "tokens"
    prefix_tokens: int = 0
    shape: tuple[int, ...] = ()  # output shape for one sample (without batch dim)


@dataclass
class _ProbeResult:
    order: dict[str, int] = field(default_factory=dict)
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    in_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    head_ok: bool = False
    head_reason: str = ""
    head_name: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    input_shape: tuple[int, ...] | None = None  # one probe sample, without the batch dim
    calls: dict[str, int] = field(default_factory=dict)  # forward calls per module
    entry: dict[str, int] = field(default_factory=dict)  # order in which modules are first entered


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the module to inspect (``torch.compile`` and DataParallel wrappers hide it)."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        return inner
    return model


def model_output_tensor(out: object) -> torch.Tensor:
    """The logits tensor inside a model output (tensor, ``.logits``, dict or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise AdapterError(
        f"the model returned {type(out).__name__}, not a logits tensor. normscore needs a "
        "classifier whose forward returns logits [B, C] (or an object with .logits). Wrap the "
        "model in a module that returns the logits tensor."
    )


def _expected_size(model: nn.Module) -> tuple[int, int] | None:
    """The fixed input size of models that require one (timm/torchvision ViTs), else None."""
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "strict_img_size", False) and getattr(pe, "img_size", None):
        s = pe.img_size
        return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))
    s = getattr(model, "image_size", None)
    if isinstance(s, int):
        return (s, s)
    return None


def model_failure(model: nn.Module, x: torch.Tensor, e: Exception) -> InputError:
    """The error raised when the model itself fails on an input (shape, size, channels)."""
    size = _expected_size(_unwrap(model))
    if x.ndim == 4 and x.shape[1] > 4 and x.shape[3] in (1, 3, 4):
        hint = "The input looks channels-last [B, H, W, C]; the model expects [B, C, H, W]: use x.permute(0, 3, 1, 2)."
    elif size is not None and tuple(x.shape[-2:]) != size:
        hint = f"This model needs {size[0]}x{size[1]} inputs (ViTs have a fixed input size); resize the images."
    else:
        hint = "Check the image size, channel count and preprocessing the model expects."
    return InputError(
        f"the model failed on an input of shape {tuple(x.shape)} ({x.dtype}): {type(e).__name__}: {e}. {hint}"
    )


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


class Adapter:
    """Resolved structure of one classifier. See the module docstring.

    Parameters
    ----------
    model:
        Any ``nn.Module`` classifier (timm, torchvision, or your own).
    head:
        Module name of the final linear layer, to override automatic resolution.
    blocks:
        Module names of the candidate blocks, in forward order, to override automatic
        resolution.
    prefix_tokens:
        Number of class/register tokens at the start of token outputs (default: the model's
        ``num_prefix_tokens``, 1 for torchvision ViT, else 0).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        head: str | None = None,
        blocks: Sequence[str] | None = None,
        prefix_tokens: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise AdapterError(
                f"expected a torch.nn.Module classifier, got {type(model).__name__}. Pass the "
                "model object (e.g. timm.create_model(...) or torchvision.models.resnet18())."
            )
        self._model_ref = weakref.ref(model)
        self._root = _unwrap(model)
        self._modules: dict[str, nn.Module] = dict(self._root.named_modules())
        self._user_head = head
        self._user_blocks = list(blocks) if blocks is not None else None
        if head is not None:
            self._check_name(head, "head")
        if self._user_blocks is not None:
            if not self._user_blocks:
                raise AdapterError("blocks=[] given; pass at least one module name or None.")
            for b in self._user_blocks:
                self._check_name(b, "block")
        self._prefix_tokens = prefix_tokens if prefix_tokens is not None else self._guess_prefix()
        self._probe: _ProbeResult | None = None
        self._lock = threading.Lock()
        self._block_infos: list[BlockInfo] | None = None

    # ------------------------------------------------------------------ names
    @property
    def model(self) -> nn.Module:
        m = self._model_ref()
        if m is None:  # pragma: no cover - the detector holds a strong reference
            raise AdapterError("the model this adapter was built for no longer exists.")
        return m

    @property
    def root(self) -> nn.Module:
        """The model the names refer to: ``model`` without a ``torch.compile`` wrapper."""
        return self._root

    @property
    def module_names(self) -> list[str]:
        return [n for n in self._modules if n]

    def module(self, name: str) -> nn.Module:
        self._check_name(name, "module")
        return self._modules[name]

    def _check_name(self, name: str, what: str) -> None:
        if name not in self._modules or name == "":
            raise AdapterError(
                f"{what} {name!r} is not a module of this model.{did_you_mean(name, self._modules)} "
                f"Valid names come from model.named_modules(), e.g. "
                f"{', '.join(repr(n) for n in list(self._modules)[1:6])}, ..."
            )

    def _guess_prefix(self) -> int:
        n = getattr(self._root, "num_prefix_tokens", None)
        if isinstance(n, int):
            return n
        if isinstance(getattr(self._root, "class_token", None), torch.Tensor):
            return 1  # torchvision VisionTransformer
        return 0

    # ------------------------------------------------------------------ static resolution
    def _static_head_name(self) -> str | None:
        if self._user_head is not None:
            return self._user_head
        root = self._root
        ids = {id(m): n for n, m in self._modules.items()}
        get_clf = getattr(root, "get_classifier", None)
        if callable(get_clf):
            try:
                clf = get_clf()
            except Exception:  # noqa: BLE001 - any failure means "not timm-like"
                clf = None
            if isinstance(clf, (nn.Linear, nn.Conv2d)) and id(clf) in ids:
                return ids[id(clf)]
        for name in ("fc", "classifier", "heads.head", "heads", "head", "head.fc", "last_linear"):
            m = self._modules.get(name)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                return name
            if isinstance(m, nn.Sequential) and len(m) and isinstance(m[-1], (nn.Linear, nn.Conv2d)):
                return f"{name}.{len(m) - 1}"
        return None

    def _static_blocks(self) -> list[str]:
        if self._user_blocks is not None:
            return list(self._user_blocks)
        names = self._known_class_blocks()
        if len(names) >= 2:
            return names
        names = self._conv_activation_blocks()
        if len(names) >= 2:
            return names
        names = self._feature_info_blocks()
        if names:
            return names
        return self._structural_blocks()

    def _known_class_blocks(self) -> list[str]:
        found: list[str] = []
        for name, m in self._modules.items():
            if not name or type(m).__name__ not in KNOWN_BLOCK_CLASSES:
                continue
            if any(name.startswith(f + ".") for f in found):
                continue  # nested inside an outer block
            found.append(name)
        return found

    def _conv_activation_blocks(self) -> list[str]:
        """Plain CNNs (VGG, AlexNet, small custom CNNs): the activation after each conv."""
        found: list[str] = []
        for name, m in self._modules.items():
            if not isinstance(m, nn.Sequential):
                continue
            children = list(m.named_children())
            if any(len(list(c.children())) for _, c in children):
                continue  # only sequences of leaf layers
            prev_kind = None
            for cname, c in children:
                if isinstance(c, nn.Conv2d):
                    prev_kind = "conv"
                elif isinstance(c, (nn.BatchNorm2d, nn.GroupNorm)) and prev_kind == "conv":
                    prev_kind = "conv"
                elif isinstance(c, _ACTIVATIONS):
                    if prev_kind == "conv":
                        found.append(f"{name}.{cname}" if name else cname)
                    prev_kind = None
                else:
                    prev_kind = None
        return found

    def _feature_info_blocks(self) -> list[str]:
        info = getattr(self._root, "feature_info", None)
        names: list[str] = []
        if isinstance(info, (list, tuple)):
            for f in info:
                mod = f.get("module") if isinstance(f, dict) else None
                if isinstance(mod, str) and mod in self._modules:
                    names.append(mod)
        return names

    def _structural_blocks(self) -> list[str]:
        """Fallback: composite modules with >= 2 same-class siblings (outermost level)."""
        found: list[str] = []
        for pname, parent in self._modules.items():
            kids = [(n, c) for n, c in parent.named_children() if len(list(c.children()))]
            kids = [(n, c) for n, c in kids if type(c) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict)]
            by_cls: dict[type, list[str]] = {}
            for n, c in kids:
                by_cls.setdefault(type(c), []).append(f"{pname}.{n}" if pname else n)
            for group in by_cls.values():
                if len(group) >= 2:
                    found.extend(group)
        outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
        return outer

    # ------------------------------------------------------------------ probe
    @property
    def resolved(self) -> bool:
        return self._probe is not None

    def ensure_resolved(self, x: torch.Tensor) -> None:
        """Run the one-sample probe on ``x[:1]`` if it has not run yet (thread-safe)."""
        if self._probe is not None:
            return
        with self._lock:
            if self._probe is None:
                self._probe = self._run_probe(x[:1])

    def _run_probe(self, x: torch.Tensor) -> _ProbeResult:
        res = _ProbeResult(input_shape=tuple(x.shape[1:]))
        counter = [0]
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        head_name = self._static_head_name()
        watch_outputs = set(self._static_blocks())
        if head_name:
            watch_outputs.add(head_name)
        first_conv: list[int] = []

        def make_pre_hook(name: str):
            def pre_hook(module: nn.Module, args: tuple) -> None:
                res.entry.setdefault(name, len(res.entry))
                res.calls[name] = res.calls.get(name, 0) + 1

            return pre_hook

        def make_hook(name: str):
            def hook(module: nn.Module, args: tuple, out: object) -> None:
                res.order[name] = counter[0]
                counter[0] += 1
                if isinstance(out, torch.Tensor):
                    res.out_shapes[name] = tuple(out.shape)
                    if name in watch_outputs or isinstance(module, (nn.Linear, nn.Conv2d)):
                        outputs[name] = out
                inp = _first_tensor(args)
                if inp is not None:
                    res.in_shapes[name] = tuple(inp.shape)
                if isinstance(module, nn.Conv2d) and not first_conv:
                    first_conv.append(module.in_channels)

            return hook

        model = self.model
        try:
            for name, m in self._modules.items():
                if name:
                    handles.append(m.register_forward_pre_hook(make_pre_hook(name)))
                    handles.append(m.register_forward_hook(make_hook(name)))
            with eval_mode(model), torch.no_grad():
                try:
                    out = model_output_tensor(model(x))
                except AdapterError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise model_failure(model, x, e) from e
        finally:
            for h in handles:
                h.remove()
        res.in_chans = first_conv[0] if first_conv else None
        if out.ndim != 2:
            res.head_reason = f"the model output has shape {tuple(out.shape)}, not [B, C] logits"
            return res
        res.num_classes = int(out.shape[1])
        res.head_name, res.head_ok, res.head_reason = self._verify_head(head_name, out, outputs, res)
        return res

    def _verify_head(
        self,
        static: str | None,
        out: torch.Tensor,
        outputs: dict[str, torch.Tensor],
        res: _ProbeResult,
    ) -> tuple[str | None, bool, str]:
        def is_logits(name: str) -> bool:
            """The model output must *be* the head output (or a view of its storage, e.g. a
            flatten after a 1x1 conv). Equal values are not enough: a ReLU after the layer can
            leave one probe sample unchanged (squeezenet at small inputs)."""
            t = outputs.get(name)
            if t is None:
                return False
            if t is out:
                return True
            if t.numel() != out.numel():
                return False
            same = t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
            if same or self._user_head == name:
                return (
                    bool(torch.equal(t.reshape(out.shape), out))
                    if same
                    else bool(torch.allclose(t.reshape(out.shape).float(), out.float(), rtol=1e-5, atol=1e-6))
                )
            return False

        def pooled_input(name: str) -> bool:
            shp = res.in_shapes.get(name, ())
            m = self._modules[name]
            if isinstance(m, nn.Linear):
                return len(shp) == 2
            if isinstance(m, nn.Conv2d):
                return len(shp) == 4 and shp[2:] == (1, 1) and m.kernel_size == (1, 1) and m.groups == 1
            return False

        if static is not None:
            m = self._modules[static]
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                reason = f"module {static!r} is a {type(m).__name__}, not nn.Linear or a 1x1 nn.Conv2d"
                if self._user_head is not None:
                    raise AdapterError(f"head={static!r}: {reason}.")
                static = None
            elif static in res.order and is_logits(static) and pooled_input(static):
                return static, True, ""
            elif self._user_head is not None:
                raise AdapterError(
                    f"head={static!r}: its output is not the model's logits or its input is not a "
                    f"pooled [B, D] tensor (input shape {res.in_shapes.get(static)}). Choose the last "
                    "linear layer, the one whose output the model returns."
                )
        # generic fallback: the last executed Linear / 1x1 conv whose output is the logits
        cands = [
            n
            for n in sorted(res.order, key=res.order.__getitem__, reverse=True)
            if isinstance(self._modules[n], (nn.Linear, nn.Conv2d))
        ]
        for n in cands:
            if is_logits(n) and pooled_input(n):
                return n, True, ""
        return (
            None,
            False,
            "no nn.Linear (or 1x1 nn.Conv2d on pooled features) produces the model's logits; the "
            "logits are computed after the last linear layer (e.g. squeezenet: conv -> ReLU -> "
            "pool), so there is no linear head (W, b) and no penultimate feature vector",
        )

    # ------------------------------------------------------------------ public resolution
    def _need_probe(self) -> _ProbeResult:
        if self._probe is None:
            raise AdapterError(
                "the adapter has not seen an input yet; call adapter.ensure_resolved(x) with one "
                "batch, or fit/score a detector first."
            )
        return self._probe

    @property
    def has_head(self) -> bool:
        return self._need_probe().head_ok

    @property
    def head_name(self) -> str:
        p = self._need_probe()
        if not p.head_ok or p.head_name is None:
            raise AdapterError(
                f"this model has no linear head: {p.head_reason}. Logit-only detectors (msp, "
                "maxlogit, energy, ...) still work; for feature detectors pass "
                "Adapter(model, head='name') if a linear layer produces the logits."
            )
        return p.head_name

    @property
    def head(self) -> nn.Module:
        return self._modules[self.head_name]

    def head_weight_bias(self, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [C, D], b [C])`` of the head in float32: detached copies, or with
        ``copy=False`` detached views of the live parameters where possible (read-only use at
        score time; no per-call copy of a large head)."""
        m = self.head
        w = m.weight.detach()
        if isinstance(m, nn.Conv2d):
            w = w[:, :, 0, 0]
        b = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
        if not copy:
            return w.float(), b.float()
        return w.float().clone(), b.float().clone()

    @property
    def num_classes(self) -> int | None:
        return self._need_probe().num_classes

    @property
    def num_features(self) -> int:
        shp = self._need_probe().in_shapes.get(self.head_name, ())
        return int(torch.Size(shp[1:]).numel())

    @property
    def module_calls(self) -> dict[str, int]:
        """How often each module ran in the probe pass (modules that did not run are absent):
        more than once for shared modules, e.g. a block applied twice."""
        return dict(self._need_probe().calls)

    @property
    def entry_order(self) -> dict[str, int]:
        """The order in which the probe pass first *entered* each module (a parent before its
        children; :meth:`blocks` are ordered by exit)."""
        return dict(self._need_probe().entry)

    @property
    def in_chans(self) -> int | None:
        return self._need_probe().in_chans

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Shape of one input sample (``(C, H, W)``) the probe ran on."""
        return self._need_probe().input_shape

    @property
    def blocks(self) -> list[BlockInfo]:
        """Candidate blocks in forward (completion) order."""
        p = self._need_probe()
        if self._block_infos is None:
            names = [n for n in self._static_blocks() if n in p.order and n in p.out_shapes]
            if self._user_blocks is not None:
                missing = [n for n in self._user_blocks if n not in p.order]
                bad = [n for n in self._user_blocks if n in p.order and n not in p.out_shapes]
                if missing:
                    raise AdapterError(f"blocks {missing} did not run in the model's forward pass.")
                if bad:
                    raise AdapterError(f"blocks {bad} do not return a single tensor.")
            else:
                names.sort(key=p.order.__getitem__)
            infos = []
            for n in names:
                shp = p.out_shapes[n]
                if len(shp) == 3:
                    layout = "tokens"
                elif len(shp) == 4:
                    layout = "nhwc" if type(self._modules[n]).__name__ in NHWC_BLOCK_CLASSES else "nchw"
                else:
                    if self._user_blocks is not None:
                        raise AdapterError(
                            f"block {n!r} outputs shape {shp}; a block must output [B, C, H, W] or [B, N, D]."
                        )
                    continue
                infos.append(BlockInfo(n, layout, self._prefix_tokens if layout == "tokens" else 0, shp[1:]))
            self._block_infos = infos
        return list(self._block_infos)

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def stage_ends(self) -> list[str]:
        """The last candidate block of every stage: each block whose successor has another
        output shape, and the last block (ResNets' ``layer1`` ... ``layer4`` outputs; one block
        for single-stage models such as ViTs). The multi-layer detectors' default layers."""
        blocks = self.blocks
        return [b.name for i, b in enumerate(blocks) if i == len(blocks) - 1 or blocks[i + 1].shape != b.shape]

    def block(self, name: str) -> BlockInfo:
        for b in self.blocks:
            if b.name == name:
                return b
        names = self.block_names
        raise AdapterError(
            f"{name!r} is not a candidate block of this model.{did_you_mean(name, names)} "
            f"Valid blocks: {names}. To use another module, build "
            "normscore.Adapter(model, blocks=[...]) and pass it as adapter=."
        )

    def describe(self) -> dict:
        """A JSON-friendly summary (used in reports and error messages)."""
        p = self._need_probe()
        return {
            "model": type(self._root).__name__,
            "head": p.head_name if p.head_ok else None,
            "head_reason": p.head_reason,
            "num_classes": p.num_classes,
            "num_features": self.num_features if p.head_ok else None,
            "blocks": [(b.name, b.layout, list(b.shape)) for b in self.blocks],
        }

    def __repr__(self) -> str:
        if self._probe is None:
            return f"Adapter({type(self._root).__name__}, unresolved)"
        d = self.describe()
        return f"Adapter({d['model']}, head={d['head']!r}, blocks={len(d['blocks'])})"


_CACHE: weakref.WeakKeyDictionary[nn.Module, Adapter] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def get_adapter(model: nn.Module) -> Adapter:
    """The cached adapter of ``model`` (created with automatic resolution on first use)."""
    with _CACHE_LOCK:
        a = _CACHE.get(model)
        if a is None:
            a = Adapter(model)
            _CACHE[model] = a
        return a


def set_adapter(model: nn.Module, adapter: Adapter) -> None:
    """Make ``adapter`` (e.g. one with overrides) the cached adapter of ``model``."""
    if adapter.model is not model:
        raise AdapterError("set_adapter: the adapter was built for a different model.")
    with _CACHE_LOCK:
        _CACHE[model] = adapter
