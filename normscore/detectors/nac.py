"""Neuron activation coverage, NAC-UE (Liu, Lochman & Zach / Liu et al., ICLR 2024, arXiv:2306.02879)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..taps import BackwardSpec, CaptureSpec, Features, block_key, capture, reduce_block
from .base import Detector
from .constraints import Constraint, Interval
from .registry import register
from .sync import sync_state

__all__ = ["NAC", "geometric_bins"]

_GRAD = "nac_grad:"


def geometric_bins(z_hat: torch.Tensor, m: int, eps: float = 1e-6) -> torch.Tensor:
    """Bin index in ``0..m-1`` of each value of ``z_hat`` in ``(0, 1)``: ``m`` bins with
    geometric edges, dense near 0 and near 1 (``m//2 + 1`` edges log-spaced on ``[eps, 0.5]``,
    mirrored on ``[0.5, 1 - eps]``). Computed in float32 exactly as pytorch-ood's ``NACUE``, so
    that states on an edge (a dead neuron's state is exactly 0.5) land in the same bin."""
    z = z_hat.float().clamp(eps, 1 - eps)
    m1 = m // 2
    lo = torch.log10(torch.tensor(eps, device=z.device))
    hi = torch.log10(torch.tensor(0.5, device=z.device))
    left = torch.logspace(lo, hi, steps=m1 + 1, device=z.device)
    right = 1.0 - left.flip(0)
    edges = torch.cat([left, right[1:]])
    return (torch.bucketize(z, edges, right=False) - 1).clamp(0, m - 1)


def _objective(z: torch.Tensor) -> torch.Tensor:
    """``KL(u || softmax(z))`` up to a constant: ``-mean_c log(p_c + 1e-12)`` per sample."""
    p = torch.softmax(z.float(), dim=1)
    return -torch.log(p + 1e-12).mean(dim=1)


def _grad_of_output(module: Any, inp: Any, grad_out: torch.Tensor, _key: str = "") -> dict[str, torch.Tensor]:
    return {_key: grad_out.detach()}


class _Names(Constraint):
    def check(self, name: str, value: Any) -> None:
        if value is None or (
            isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value)
        ):
            return
        raise ConfigError(f"hyperparameter {name}={value!r} must be None or a non-empty list of block names.")


@register
class NAC(Detector):
    """Neuron activation coverage, NAC-UE (Liu et al., "Neuron Activation Coverage: Rethinking
    Out-of-distribution Detection and Generalization", ICLR 2024, arXiv:2306.02879; code
    github.com/BierOne/ood_coverage; pytorch-ood ``NACUE``).

    For a block output ``z`` and ``KL = -mean_c log(softmax(f(x))_c + 1e-12)`` (the KL divergence
    to the uniform distribution up to a constant), each neuron ``n`` (channel; its mean over
    positions) gets the state ``s_n(x) = sigmoid(alpha * mean_pos(z * dKL/dz))``. The fit counts,
    per neuron, how many ID samples fall in each of ``m_bins`` geometric bins of ``(0, 1)``;
    the score is the coverage of the bins a sample hits::

        score(x) = sum_l mean_n min(count_{l,n}(bin(s_n(x))) / O*, 1)       (higher = more ID)

    Defaults as pytorch-ood: ``m_bins = 50``, ``alpha = 100``, ``o_star = 50``. ``blocks``: block
    names; default the last candidate block of every stage (the last block before each change of
    output shape, and the last block: ResNets' ``layer1..layer4`` outputs as in the official
    code; one block for single-stage models such as ViTs).

    Implementation notes: one batched backward pass per batch (fit and score), run by the detector
    itself (the shared pass only provides the input, as for ODIN); each block's output
    ``z`` is captured raw and its gradient by a backward callback (``dKL/dz`` per sample, the model
    in eval mode), so their product is exact. Histograms are exact integer counts summed over
    batches (and ranks). Token layouts: the neuron state is the mean over patch tokens of each
    channel (pytorch-ood flattens non-4-D outputs into ``N x D`` neurons instead). The official
    code also tunes per-layer hyperparameters on validation data; here one value is shared by all
    layers.
    """

    name = "nac"
    paper = "Liu et al., ICLR 2024, arXiv:2306.02879"
    formula = "sum_l mean_n min(count_ln(bin(sigmoid(alpha * mean_pos(z * dKL(u||p)/dz)))) / O*, 1)"
    needs_fit = True
    needs_gradients = True
    feature_only = False
    constraints = {
        "blocks": _Names(),
        "m_bins": Interval(2, 10_000, integer=True),
        "alpha": Interval(0.0, math.inf, closed="neither"),
        "o_star": Interval(1, math.inf, integer=True),
    }
    search_space = {"alpha": [100.0, 1000.0, 10000.0], "m_bins": [20, 50, 100], "o_star": [5, 50]}

    def __init__(
        self, blocks: list[str] | None = None, m_bins: int = 50, alpha: float = 100.0, o_star: int = 50
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.m_bins = m_bins
        self.alpha = alpha
        self.o_star = o_star

    # ------------------------------------------------------------------ specs
    def _selected(self, adapter) -> list[str]:
        if self.blocks is not None:
            for b in self.blocks:
                adapter.block(b)
            return list(self.blocks)
        names = adapter.block_names
        if not names:
            raise ConfigError(
                "nac needs block feature maps, but the model has no candidate blocks. Pass "
                "normscore.Adapter(model, blocks=[...]) as adapter=."
            )
        return adapter.stage_ends

    def _spec(self, blocks: list[str]) -> CaptureSpec:
        key = tuple(blocks)
        cached = self.__dict__.get("_spec_cache")
        if cached is None or cached[0] != key:  # one BackwardSpec object per block set (specs merge by identity)
            layers = {b: (lambda m, i, g, _k=_GRAD + b: _grad_of_output(m, i, g, _k)) for b in blocks}
            bw = BackwardSpec(_objective, layers=layers, key="nac:kl_uniform")
            spec = CaptureSpec(logits=True, blocks=frozenset((b, "raw") for b in blocks), backward=bw)
            cached = self.__dict__["_spec_cache"] = (key, spec)
        return cached[1]

    def capture_spec(self, adapter, stage):
        # the shared pass only provides the validated input: the backward pass is our own, so it
        # never forces gradients on the detectors sharing the pass (nor clashes with their objectives)
        return CaptureSpec(logits=False, input=True)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        x = self._validated_input(x)
        return self._score(self._capture(x, self.blocks_))

    def _capture(self, x: torch.Tensor, blocks: list[str], index: torch.Tensor | None = None) -> Features:
        return capture(self.adapter, x, self._spec(blocks), validated=True, index=index)

    # ------------------------------------------------------------------ states
    def _states(self, feats: Features, blocks: list[str]) -> list[torch.Tensor]:
        """Per block the bin index ``[B, N]`` of every neuron's state."""
        adapter = self.adapter
        out = []
        for b in blocks:
            z = feats.require(block_key(b, "raw"))
            g = feats.get(_GRAD + b)
            if g is None:
                raise InputError(f"nac: no gradient reached block {b!r} (its output does not affect the logits).")
            prod = reduce_block((z.float() * g.float()), adapter.block(b), "gap")
            s = torch.sigmoid(float(self.alpha) * prod.float())
            out.append(geometric_bins(s, int(self.m_bins)))
        return out

    # ------------------------------------------------------------------ fit
    _fit_state = (("_counts", "sum"),)

    def _fit(self, stream):
        adapter = stream.adapter
        self._counts: torch.Tensor | None = None
        blocks: list[str] | None = None
        m = int(self.m_bins)
        for b in stream.inputs(split="fit"):  # the first batch resolves the adapter
            if blocks is None:
                blocks = self._selected(adapter)
            feats = self._capture(b.x, blocks, b.index)
            self.num_classes_ = int(feats.require("logits").shape[1])
            states = torch.cat(self._states(feats, blocks), dim=1)  # [B, N]
            if self._counts is None:
                self.layer_sizes_ = [int(s.shape[1]) for s in self._states(feats, blocks)]
                self._counts = torch.zeros(states.shape[1], m, dtype=torch.int64)
            flat = (torch.arange(states.shape[1], device=states.device) * m)[None, :] + states
            self._counts.view(-1).add_(torch.bincount(flat.flatten().cpu(), minlength=self._counts.numel()))
        sync_state(self)
        if self._counts is None or blocks is None:
            raise InputError("nac saw no fit samples; pass a loader with ID training data.")
        self.blocks_ = blocks
        self.counts_ = self._counts
        del self._counts
        self.fitted_ = True
        return None  # the held-out samples are scored in one extra pass (no raw maps kept)

    # ------------------------------------------------------------------ score
    def score_features(self, feats: Features) -> torch.Tensor:
        self._check_fitted()
        return self._score(self._capture(feats.require("input"), self.blocks_))

    def _score(self, feats: Features) -> torch.Tensor:
        z = feats.require("logits")
        if int(z.shape[1]) != int(self.num_classes_):
            raise InputError(
                f"nac: the 'logits' features have shape [{int(z.shape[1])}] per sample, but the detector was "
                f"fitted on [{int(self.num_classes_)}]. The model is not the one it was fitted on: refit it on "
                "this model (det.fit(model, id_loader))."
            )
        states = self._states(feats, self.blocks_)
        for b, s, n in zip(self.blocks_, states, self.layer_sizes_):
            if int(s.shape[1]) != int(n):
                raise InputError(
                    f"nac: block {b!r} has {int(s.shape[1])} neurons, but the detector was fitted on {int(n)}: "
                    "refit it on this model (det.fit(model, id_loader))."
                )
        counts = self.counts_.split(self.layer_sizes_, dim=0)
        total = torch.zeros(states[0].shape[0], dtype=torch.float64, device=states[0].device)
        for c, s in zip(counts, states):
            o = c.to(s.device).gather(1, s.t()).t().double()
            total += (o / float(self.o_star)).clamp(max=1.0).mean(dim=1)
        return total.float()
