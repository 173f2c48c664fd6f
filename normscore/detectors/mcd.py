"""Monte-Carlo dropout (Gal & Ghahramani, ICML 2016, arXiv:1506.02142), seeded per sample."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import Adapter
from ..errors import NotApplicableError
from ..taps import CaptureSpec, Features, capture, override
from .base import Detector
from .constraints import Interval, OneOf
from .registry import register

_NO_DROPOUT = (
    "mcd where='model' needs dropout modules (nn.Dropout / Dropout1d/2d/3d with p > 0), and this model has "
    "none. Use where='head' (OpenOOD-style dropout with rate p on the penultimate features) or a model "
    "trained with dropout."
)

__all__ = ["MCD", "sample_keys"]

_MASK64 = (1 << 63) - 1
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def sample_keys(x: torch.Tensor) -> list[int]:
    """A 64-bit key per sample from the bytes of its (validated) input: the dropout masks of a
    sample depend on its content and the seed only, never on the batch it comes in."""
    flat = x.detach().reshape(x.shape[0], -1).contiguous().cpu()
    raw = flat.view(torch.uint8) if flat.dtype != torch.bfloat16 else flat.float().view(torch.uint8)
    return [int.from_bytes(hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest(), "little") for row in raw]


def _seed(key: int, seed: int, n: int) -> int:
    h = hashlib.blake2b(f"{key}:{seed}:{n}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & _MASK64


class _Masks:
    """Per-sample generators of one stochastic pass: each dropout call draws, for every sample,
    the next uniforms of that sample's generator (in forward order)."""

    def __init__(self, keys: list[int], seed: int, n: int) -> None:
        self.gens = [torch.Generator().manual_seed(_seed(k, seed, n)) for k in keys]

    def keep(self, shape: tuple[int, ...], p: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Scaled keep masks ``[B, *shape]``: ``1/(1-p)`` where kept, 0 where dropped."""
        u = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in self.gens])
        return ((u >= p).to(dtype) / (1.0 - p)).to(device)


@register
class MCD(Detector):
    """Monte-Carlo dropout (Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML 2016,
    arXiv:1506.02142; pytorch-ood ``MCD``, OpenOOD ``dropout`` postprocessor).

    ``N = samples`` stochastic forward passes with dropout active give softmax outputs ``p_n``
    and logits ``z_n``; with ``mu = mean_n p_n``::

        "var"     score = -(1/C) sum_c  (1/(N-1)) sum_n (p_n,c - mu_c)^2     (pytorch-ood default)
        "mean"    score = max_c mu_c                                        (pytorch-ood mode="mean")
        "openood" score = max_c softmax(mean_n z_n)_c                        (OpenOOD)

    (higher = more ID). ``where``: ``"model"`` (default; pytorch-ood) - the model's own
    ``nn.Dropout`` / ``nn.Dropout1d/2d/3d`` modules with ``p > 0``, at their own rates (a model
    without any raises NotApplicableError, a ConfigError, on attach); ``"head"`` (OpenOOD's ``DropoutNet``) - element-wise
    dropout with rate ``p`` on the penultimate features, before the head (works on any model
    with a linear head; the model's own dropout stays off).

    Implementation notes: the model stays in eval mode (BatchNorm uses its running statistics,
    as pytorch-ood's ``batch_norm=True``); dropout is applied by hooks registered for the call
    only (:mod:`normscore.detectors._override`) - no module's ``training`` flag is touched and
    dropout written as ``F.dropout(..., training=self.training)`` inside a ``forward`` (e.g. timm's
    ``drop_rate`` head) stays off, as do stochastic-depth layers (pytorch-ood's ``model.train()``
    would switch those on too). Masks are seeded per *sample*: a 64-bit hash of the sample's
    input bytes, ``seed`` and the pass index seed its own generator, so scores are deterministic,
    independent of the global RNG and of batch size / composition / order (identical inputs get
    identical masks). Cost: ``samples`` forward passes (no backward); masks are drawn on the
    CPU, one generator call per sample and dropout call.
    """

    name = "mcd"
    shape_bound = frozenset()  # fit-free: works on whatever the attached model produces
    paper = "Gal & Ghahramani, ICML 2016, arXiv:1506.02142"
    formula = "-mean_c var_n softmax(z_n)_c over N dropout passes (variant 'mean': max_c mean_n softmax)"
    feature_only = False
    constraints = {
        "samples": Interval(2, 100_000, integer=True),
        "variant": OneOf(("var", "mean", "openood")),
        "where": OneOf(("model", "head")),
        "p": Interval(0.0, 1.0, closed="left"),
        "seed": Interval(0, 2**62, integer=True),
    }
    search_space = {"variant": ["var", "mean", "openood"], "samples": [5, 30]}

    def __init__(
        self, samples: int = 30, variant: str = "var", where: str = "model", p: float = 0.5, seed: int = 0
    ) -> None:
        super().__init__()
        self.samples = samples
        self.variant = variant
        self.where = where
        self.p = p
        self.seed = seed

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=False, input=True)  # the stochastic passes are our own

    def dropout_modules(self, adapter: Adapter | None = None) -> list[str]:
        """Names of the model's dropout modules that ``where="model"`` activates."""
        a = adapter if adapter is not None else self.adapter
        return [n for n in a.module_names if isinstance(a.module(n), _DROPOUTS) and float(a.module(n).p) > 0]

    def check_model(self, adapter: Adapter) -> None:
        if self.where == "model" and not self.dropout_modules(adapter):
            raise NotApplicableError(_NO_DROPOUT)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        x = self._validated_input(x)
        return self._mcd(x)

    def score_features(self, feats: Features) -> torch.Tensor:
        return self._mcd(feats.require("input"))

    def _hooks(self, masks: _Masks) -> tuple[dict, dict]:
        if self.where == "head":
            p = float(self.p)

            def head_in(_m: nn.Module, h: torch.Tensor) -> torch.Tensor:
                return h * masks.keep(tuple(h.shape[1:]), p, h.device, h.dtype)

            return {}, {self.adapter.head_name: head_in}
        names = self.dropout_modules()
        if not names:
            raise NotApplicableError(_NO_DROPOUT)

        def drop(m: nn.Module, out: torch.Tensor) -> torch.Tensor:
            p = float(m.p)
            shape = tuple(out.shape[1:])
            if not isinstance(m, nn.Dropout):  # channel-wise: one draw per channel
                shape = (shape[0],) + (1,) * (len(shape) - 1)
            return out * masks.keep(shape, p, out.device, out.dtype)

        return {n: drop for n in names}, {}

    def pass_logits(self, x: torch.Tensor, n: int, keys: list[int] | None = None) -> torch.Tensor:
        """Logits ``[B, C]`` of stochastic pass ``n`` on a validated batch."""
        masks = _Masks(keys if keys is not None else sample_keys(x), int(self.seed), n)
        outputs, inputs = self._hooks(masks)
        with override(self.adapter, outputs=outputs, inputs=inputs):
            return capture(self.adapter, x, CaptureSpec(logits=True), validated=True)["logits"]

    def _head_passes(self, x: torch.Tensor, keys: list[int]):
        """``where="head"``: the network up to the head runs once; each stochastic pass is the
        head on masked penultimate features (what a pass through the whole model computes, since
        dropout acts on the head's input only)."""
        h = capture(self.adapter, x, CaptureSpec(logits=False, penultimate=True), validated=True)["penultimate"]
        w, b = self.adapter.head_weight_bias(copy=False)
        p = float(self.p)
        for n in range(int(self.samples)):
            masks = _Masks(keys, int(self.seed), n)
            yield F.linear(h * masks.keep(tuple(h.shape[1:]), p, h.device, h.dtype), w.detach(), b.detach())

    def _mcd(self, x: torch.Tensor) -> torch.Tensor:
        keys = sample_keys(x)
        n_pass = int(self.samples)
        s1 = s2 = zs = None
        if self.where == "head":
            passes = self._head_passes(x, keys)
        else:
            passes = (self.pass_logits(x, n, keys) for n in range(n_pass))
        for z in passes:
            z = z.double()
            p = torch.softmax(z, dim=1)
            s1 = p if s1 is None else s1 + p
            s2 = p * p if s2 is None else s2 + p * p
            zs = z if zs is None else zs + z
        assert s1 is not None and s2 is not None and zs is not None
        mu = s1 / n_pass
        if self.variant == "mean":
            return mu.amax(dim=1).float()
        if self.variant == "openood":
            return torch.softmax(zs / n_pass, dim=1).amax(dim=1).float()
        var = ((s2 - n_pass * mu * mu) / (n_pass - 1)).clamp_min(0)
        return (-var.mean(dim=1)).float()
