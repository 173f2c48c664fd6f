"""GROOD: nearest neighbours in the space of gradients towards an OOD prototype."""

from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..taps import Features
from ._zoo import check_labels, feature_positions, hash_positions
from .base import Detector
from .constraints import Interval, OneOf
from .layer import LayerFeatures
from .registry import register

__all__ = ["GROOD"]


@register
class GROOD(LayerFeatures, Detector):
    """GROOD: ``-min_i |g(h) - g(h_i)|^2`` over the correctly classified fit samples ``i``.

    Class prototypes ``p_c`` are the mean penultimate features of the fit samples of class ``c``;
    the OOD prototype ``p_0`` is the mean of the class prototypes. With the nearest-prototype
    logits ``s_j = -|h - p_j|`` over ``j = 1..C, 0``, ``g(h)`` is the gradient of the cross-entropy
    ``CE(s, argmax z)`` with respect to ``p_0``, in closed form ``softmax(s)_0 (h - p_0) / |h - p_0|``.
    The score is the negative squared distance of ``g(x)`` to its nearest neighbour among the
    gradients of the fit samples the model classifies correctly. ElAraby, Sahoo, Pequignot,
    Novello & Paull, "GROOD: Gradient-Aware Out-of-Distribution Detection", TMLR 2025,
    arXiv:2312.14427; OpenOOD v1.5 ``grood.py``.

    Defaults and deviations: OpenOOD's config builds ``p_0`` from *validation OOD* samples
    (``use_val_ood: True``); here no OOD data is used by default - ``p_0`` is the mean of the ID
    prototypes (OpenOOD's ``use_proto_mean`` option; the other ID-only options of ``grood.py``
    need extra model passes on generated images or mid-layer mixup and are not offered). The
    gradient uses the closed form (``use_direct_grad``, equal to the autograd gradient of the
    default loss up to float rounding); prototypes of classes without fit samples stay zero, as
    in ``grood.py``. The search is exact (chunked float64 distances) where OpenOOD uses a faiss
    ``IndexIVFFlat`` with ``nprobe = 4``. ``alpha`` < 1 keeps a hash subsample of the fit rows in
    the bank (OpenOOD's ``sampling_ratio``, default 1); the bank is ``N x D`` float32 (the method
    needs it, like KNN). Prototypes and the bank gradients are exact and batch-size invariant:
    the bank keeps the penultimate features and the gradients are taken after the prototypes
    are final.
    """

    name = "grood"
    paper = "ElAraby et al., TMLR 2025, arXiv:2312.14427"
    formula = "-min_i |g(h) - g(h_i)|^2, g(h) = softmax(-|h - p_j|)_0 (h - p_0)/|h - p_0|, p_0 = mean_c p_c"
    needs_labels = True
    per_class = True
    needs_fit = True
    constraints = {"ood_prototype": OneOf(("proto_mean",)), "alpha": Interval(0.0, 1.0, closed="right")}
    _salt = 13
    _chunk = 16384

    def __init__(
        self,
        ood_prototype: str = "proto_mean",
        alpha: float = 1.0,
        layer: str | list[str] = "penultimate",
        layer_aggregation: str = "concat",
    ) -> None:
        super().__init__()
        self.ood_prototype = ood_prototype
        self.alpha = alpha
        self.layer = layer
        self.layer_aggregation = layer_aggregation

    def capture_spec(self, adapter, stage):
        return self.layer_spec(adapter, logits=True)

    _fit_state = (("_sums", "sum"), ("_counts", "sum"), ("_seen", "sum"), ("_parts", "cat"), ("_pos", "cat"))
    _fit_order = "_pos"

    def _fit_begin(self, adapter) -> None:
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._parts: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self._seen = 0

    def _fit_update(self, feats: Features) -> None:
        h = self.layer_features(feats).float()
        z = feats.require("logits").to(h.device)
        c = z.shape[1]
        y = check_labels(feats["labels"].to(h.device), c, self.name)
        if self._sums is None:
            self._sums = torch.zeros(c, h.shape[1], dtype=torch.float64, device=h.device)
            self._counts = torch.zeros(c, dtype=torch.float64, device=h.device)
        assert self._counts is not None
        self._sums.index_add_(0, y, h.double())
        self._counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        pos = feature_positions(feats, self._seen).to(h.device)
        keep = z.argmax(1) == y
        if float(self.alpha) < 1.0:
            keep &= hash_positions(pos, self._salt).to(h.device) < float(self.alpha)
        self._parts.append(h[keep])
        self._pos.append(pos[keep])
        self._seen += h.shape[0]

    def _fit_end(self) -> None:
        if self._sums is None or self._counts is None:
            raise InputError("grood saw no fit samples.")
        rows = torch.cat(self._parts)
        protos = self._sums / self._counts.clamp_min(1)[:, None]  # absent classes: 0, as grood.py
        self.prototypes_ = torch.cat([protos, protos.mean(0, keepdim=True)])  # [C + 1, D], OOD last
        del self._sums, self._counts, self._parts, self._pos, self._seen
        if rows.shape[0] == 0:
            raise InputError(
                "grood: the model classifies none of the fit samples correctly (or alpha kept none), "
                "so its gradient bank is empty. Fit on labelled ID training data of the model's classes."
            )
        self.bank_ = self.gradients(rows).float()
        self.fit_alpha_ = float(self.alpha)

    def gradients(self, h: torch.Tensor) -> torch.Tensor:
        """``g(h)`` ``[B, D]`` in float64: the CE gradient w.r.t. the OOD prototype."""
        p = self.prototypes_.to(h.device)
        h = h.double()
        d2 = (h * h).sum(1, keepdim=True) - 2.0 * (h @ p.T) + (p * p).sum(1)[None, :]
        ncc = -d2.clamp_min(0).sqrt()
        v = h - p[-1]
        unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.softmax(ncc, dim=1)[:, -1:] * unit

    def score_features(self, feats: Features) -> torch.Tensor:
        if float(self.alpha) != self.fit_alpha_:
            raise ConfigError(
                f"grood: alpha was changed to {self.alpha} after fitting with alpha={self.fit_alpha_}; "
                "the bank depends on it. Refit the detector."
            )
        bank = self.bank_
        q = self.gradients(self.layer_features(feats).to(bank.device))
        q_sq = (q * q).sum(1, keepdim=True)
        best = torch.full((q.shape[0],), float("inf"), dtype=torch.float64, device=bank.device)
        for s in range(0, bank.shape[0], self._chunk):
            b = bank[s : s + self._chunk].double()
            d2 = (q_sq - 2.0 * (q @ b.T) + (b * b).sum(1)[None, :]).clamp_min(0)
            best = torch.minimum(best, d2.amin(1))
        return (-best).float()
