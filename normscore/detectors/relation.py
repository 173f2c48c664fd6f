"""Relation: the neural-relation-graph score of OpenOOD's ``relation`` postprocessor."""

from __future__ import annotations

import torch

from ..errors import ConfigError, InputError
from ..taps import Features
from ._zoo import feature_positions, hash_positions
from .base import Detector
from .constraints import Interval
from .layer import LayerFeatures
from .registry import register

__all__ = ["Relation"]


def _relation_unit(h: torch.Tensor) -> torch.Tensor:
    """OpenOOD's ``normalize``: ``h / sqrt(|h|^2 + 1e-10)``."""
    h = h.float()
    return h / torch.sqrt((h * h).sum(1, keepdim=True) + 1e-10)


@register
class Relation(LayerFeatures, Detector):
    """Neural relation graph score: ``sum_i [r_i > t] r_i^pow``, ``r_i = max(z . z_i, 0) (p . p_i)``.

    ``z = h / sqrt(|h|^2 + 1e-10)`` are the normalised penultimate features and ``p = softmax(z_logits)``
    the class probabilities of the test sample; ``z_i, p_i`` those of every fit sample (the bank);
    edges with ``|r_i| <= thres`` are cut. High = ID (many strong relations to ID training data).
    Kim, Yun & Song, "Neural Relation Graph: A Unified Framework for Identifying Label Noise and
    Outlier Data", NeurIPS 2023, arXiv:2301.12321; OpenOOD v1.5 ``relation_postprocessor.py``
    (code from snu-mllab/Neural-Relation-Graph), whose defaults are kept: ``pow = 1``,
    ``thres = 0.03``, the whole fit split as the bank.

    Implementation: the method needs the bank (``N x (D + C)`` float32, like KNN); ``alpha < 1``
    keeps a hash subsample of the fit rows (by position, so it does not depend on the batch
    size) for very large fits. The kernel is evaluated in chunks of 16384 bank rows, so the
    memory per batch is ``B x 16384``. ``pow`` and ``thres`` apply at score time (no refit).
    """

    name = "relation"
    paper = "Kim, Yun & Song, NeurIPS 2023, arXiv:2301.12321"
    formula = "sum_i [r_i > thres] r_i^pow, r_i = max(z.z_i, 0) * (p.p_i), z = h/|h|, p = softmax(logits)"
    needs_fit = True
    constraints = {
        "pow": Interval(0.0, float("inf"), closed="neither"),
        "thres": Interval(0.0, 1.0, closed="left"),
        "alpha": Interval(0.0, 1.0, closed="right"),
    }
    search_space = {"pow": [1, 2, 4, 6, 8]}
    _salt = 7
    _chunk = 16384

    def __init__(
        self,
        pow: float = 1,
        thres: float = 0.03,
        alpha: float = 1.0,
        layer: str | list[str] = "penultimate",
        layer_aggregation: str = "concat",
    ) -> None:
        super().__init__()
        self.pow = pow
        self.thres = thres
        self.alpha = alpha
        self.layer = layer
        self.layer_aggregation = layer_aggregation

    def capture_spec(self, adapter, stage):
        return self.layer_spec(adapter, logits=True)

    def _rows(self, feats: Features) -> tuple[torch.Tensor, torch.Tensor]:
        z = _relation_unit(self.layer_features(feats))
        p = torch.softmax(feats.require("logits").float(), dim=1).to(z.device)
        return z, p

    _fit_state = (("_seen", "sum"), ("_parts", "cat"), ("_pos", "cat"))
    _fit_order = "_pos"

    def _fit_begin(self, adapter) -> None:
        self._parts: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self._seen = 0

    def _fit_update(self, feats: Features) -> None:
        z, p = self._rows(feats)
        rows = torch.cat([z, p], dim=1)
        pos = feature_positions(feats, self._seen).to(rows.device)
        if float(self.alpha) < 1.0:
            keep = hash_positions(pos, self._salt).to(rows.device) < float(self.alpha)
            rows, pos = rows[keep], pos[keep]
        self._parts.append(rows)
        self._pos.append(pos)
        self._seen += feats.batch_size

    def _fit_end(self) -> None:
        bank = torch.cat(self._parts) if self._parts else torch.zeros(0, 0)
        del self._parts, self._pos, self._seen
        if bank.shape[0] == 0:
            raise InputError(f"relation: the bank is empty (alpha={self.alpha}); raise alpha or fit on more data.")
        self.bank_ = bank
        self.fit_alpha_ = float(self.alpha)

    def score_features(self, feats: Features) -> torch.Tensor:
        if float(self.alpha) != self.fit_alpha_:
            raise ConfigError(
                f"relation: alpha was changed to {self.alpha} after fitting with alpha={self.fit_alpha_}; "
                "the bank depends on it. Refit the detector."
            )
        z, p = self._rows(feats)
        d = z.shape[1]
        bank = self.bank_
        z, p = z.to(bank.device), p.to(bank.device)
        out = torch.zeros(z.shape[0], dtype=torch.float64, device=bank.device)
        thres, pw = float(self.thres), float(self.pow)
        for s in range(0, bank.shape[0], self._chunk):
            part = bank[s : s + self._chunk]
            rel = (z @ part[:, :d].T).clamp_min(0.0) * (p @ part[:, d:].T)
            rel = torch.where(rel.abs() > thres, rel, torch.zeros_like(rel))
            out += (rel.pow(pw) if pw != 1.0 else rel).double().sum(1)
        return out.float()
