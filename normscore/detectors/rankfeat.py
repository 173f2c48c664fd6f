"""RankFeat: rank-1 feature removal (Song, Sebe & Wang, NeurIPS 2022, arXiv:2209.08590)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..adapters import Adapter, BlockInfo
from ..errors import ConfigError
from ..taps import CaptureSpec, Features, capture, override
from .base import Detector
from .constraints import Constraint, Interval, OneOf
from .registry import register

__all__ = ["RankFeat", "remove_rank1"]


def remove_rank1(t: torch.Tensor, info: BlockInfo) -> torch.Tensor:
    """``t`` with each sample's rank-1 approximation ``s_1 u_1 v_1^T`` removed from its
    channels x positions matrix (patch tokens only for token layouts; class/register tokens are
    kept). Computed in float64 by SVD; returned in ``t``'s dtype and layout."""
    if info.layout == "nchw":
        m = t.flatten(2)  # [B, C, S]
    elif info.layout == "nhwc":
        m = t.flatten(1, 2)  # [B, S, C]
    elif info.layout == "tokens":
        m = t[:, info.prefix_tokens :]  # [B, N, D]
    else:  # pragma: no cover - the adapter only reports these layouts
        raise ValueError(info.layout)
    md = m.double()
    u, s, vh = torch.linalg.svd(md, full_matrices=False)
    rank1 = s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])
    out = (md - rank1).to(t.dtype)
    if info.layout == "nchw":
        return out.reshape(t.shape)
    if info.layout == "nhwc":
        return out.reshape(t.shape)
    return torch.cat([t[:, : info.prefix_tokens], out], dim=1)


class _OptionalName(Constraint):
    def check(self, name: str, value: Any) -> None:
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"hyperparameter {name}={value!r} must be a block name (str) or None.")


@register
class RankFeat(Detector):
    """RankFeat (Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution
    Detection", NeurIPS 2022, arXiv:2209.08590).

    A block's output ``X`` (per sample a ``C x S`` matrix: channels x positions) loses its
    dominant singular component, the rest of the network runs on the result, and the logits
    ``z'`` are scored with the energy at temperature ``T``::

        X' = X - s_1 u_1 v_1^T ,   score(x) = T * logsumexp(z'(x) / T)      (higher = more ID)

    Variants:

    * ``"pytorch_ood"`` (default; pytorch-ood 0.4 ``RankFeat``): one block, ``block`` (default
      the last candidate block of the adapter, e.g. ResNet's last residual block = stage-4 output).
    * ``"openood"`` (OpenOOD ``rankfeat_postprocessor.py``, the authors' ResNet setting): the
      logits of two modified passes are averaged before the energy: the last block, and
      ``fuse_block`` (default the last block of the previous stage: the last candidate block
      whose output shape differs from the last block's; for single-stage models such as ViTs,
      the second-to-last block).

    Implementation notes: the block output is replaced inside the forward pass by a hook
    registered for the call only (:mod:`normscore.detectors._override`); the model is never
    changed. Cost: one extra forward pass per modified block (1 for ``"pytorch_ood"``, 2 for
    ``"openood"``) on top of the shared pass, which only provides the validated input. The SVD
    is exact (float64); OpenOOD's ``accelerate`` power iteration is not offered. Token layouts
    use the patch tokens (class/register tokens stay as they are); channels-last maps are
    handled in their own layout.
    """

    name = "rankfeat"
    shape_bound = frozenset()  # fit-free: works on whatever the attached model produces
    paper = "Song, Sebe & Wang, NeurIPS 2022, arXiv:2209.08590"
    formula = "T*logsumexp(z(x; X_l - s1 u1 v1^T)/T)"
    feature_only = False
    constraints = {
        "block": _OptionalName(),
        "fuse_block": _OptionalName(),
        "temperature": Interval(0.0, math.inf, closed="neither"),
        "variant": OneOf(("pytorch_ood", "openood")),
    }
    search_space = {"variant": ["pytorch_ood", "openood"], "temperature": [0.5, 1.0, 2.0]}

    def __init__(
        self,
        block: str | None = None,
        fuse_block: str | None = None,
        temperature: float = 1.0,
        variant: str = "pytorch_ood",
    ) -> None:
        super().__init__()
        self.block = block
        self.fuse_block = fuse_block
        self.temperature = temperature
        self.variant = variant

    def capture_spec(self, adapter, stage):
        # the shared pass only provides the validated input; the modified passes are our own
        return CaptureSpec(logits=False, input=True)

    def blocks_used(self, adapter: Adapter) -> list[str]:
        """The blocks whose outputs are modified (one pass each)."""
        names = adapter.block_names
        if not names:
            raise ConfigError(
                "rankfeat needs block feature maps, but the model has no candidate blocks. Pass "
                "normscore.Adapter(model, blocks=[...]) as adapter=."
            )
        last = self.block if self.block is not None else names[-1]
        adapter.block(last)  # AdapterError listing the valid blocks
        if self.variant == "pytorch_ood":
            return [last]
        if self.fuse_block is not None:
            adapter.block(self.fuse_block)
            return [last, self.fuse_block]
        i = names.index(last)
        shape = adapter.block(last).shape
        earlier = [n for n in names[:i] if adapter.block(n).shape != shape]
        if earlier:
            return [last, earlier[-1]]
        if i == 0:
            raise ConfigError(f"rankfeat variant='openood' needs a block before {last!r}; pass fuse_block=.")
        return [last, names[i - 1]]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        x = self._validated_input(x)
        return self._rankfeat(x)

    def score_features(self, feats: Features) -> torch.Tensor:
        return self._rankfeat(feats.require("input"))

    def modified_logits(self, x: torch.Tensor, block: str) -> torch.Tensor:
        """Logits ``[B, C]`` of a validated batch with ``block``'s rank-1 component removed."""
        adapter = self.adapter
        info = adapter.block(block)
        with override(adapter, outputs={block: lambda _m, out: remove_rank1(out, info)}):
            return capture(adapter, x, CaptureSpec(logits=True), validated=True)["logits"]

    def _rankfeat(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks_used(self.adapter)
        z = sum(self.modified_logits(x, b).double() for b in blocks) / len(blocks)
        t = float(self.temperature)
        return (t * torch.logsumexp(z / t, dim=1)).float()
