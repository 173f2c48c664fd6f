"""The test-time score of Pursuing Feature Separation (PFS)."""

from __future__ import annotations

import torch

from ..taps import CaptureSpec, Features
from .base import Detector
from .registry import register


@register
class Separation(Detector):
    """MSP plus the L1 norm of the cosines between the feature and every class weight.

    ``S(x) = max_c softmax(f(x))_c + sum_c |z^ . w^_c|`` with ``z^ = z/||z||`` the normalised
    penultimate feature (the input of the linear head) and ``w^_c = w_c/||w_c||`` the
    normalised rows of the head weight ``W`` (``[C, D]``). Higher = more in-distribution.

    It matches a model fine-tuned with PFS's separation loss (auxiliary OOD features pushed
    orthogonal to every class weight) and clustering loss (ID features pulled onto their class
    weight): ``normscore.finetune`` trains such models; on a plain classifier the score still
    works but the cosine term is rarely informative. Wu, Yu, Cheng, He & Huang, "Pursuing
    Feature Separation based on Neural Collapse for Out-of-Distribution Detection", ICLR 2025,
    arXiv:2405.17816 (official code: ``score_type == 'ours'``).
    """

    name = "separation"
    paper = "Wu et al., ICLR 2025, arXiv:2405.17816"
    formula = "max_c softmax(f)_c + sum_c |z^ . w^_c|, z^ = z/||z||, w^_c = w_c/||w_c||"

    def __init__(self) -> None:
        super().__init__()

    def capture_spec(self, adapter, stage):
        return CaptureSpec(logits=True, penultimate=True)

    def score_features(self, feats: Features) -> torch.Tensor:
        logits = feats.require("logits").float()
        z = feats.require("penultimate").float()
        adapter = self.adapter

        def unit_rows() -> torch.Tensor:
            w, _ = adapter.head_weight_bias(copy=False)
            return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

        w = self._memo("unit_w", (adapter.head.weight,), unit_rows).to(z.device)
        zh = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        msp = torch.softmax(logits, dim=1).amax(dim=1)
        return msp + (zh @ w.t()).abs().sum(dim=1)
