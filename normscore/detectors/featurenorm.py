"""FeatureNorm with jigsaw NormRatio block selection (Yu et al., CVPR 2023, arXiv:2212.02295)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import AdapterError, ConfigError, InputError, NotFittedError
from ..taps import ALL_BLOCKS, CaptureSpec, Features, block_key, parse_key, register_reduction, view_key
from .base import Detector
from .constraints import Constraint, Interval, OneOf
from .engines.jigsaw import jigsaw_view
from .registry import register

__all__ = ["FeatureNorm"]

_RED = "featurenorm"
_EPS = 1e-12


def feature_norm(v: torch.Tensor) -> torch.Tensor:
    """FeatureNorm of a block output seen as ``[B, C, S]``: the mean over channels of the L2 norm
    over positions of ``ReLU(A_c)``, ``[B]`` (the block reduction ``"featurenorm"``)."""
    return torch.relu(v).norm(dim=2).mean(dim=1)


register_reduction(_RED, feature_norm)


class _OptionalName(Constraint):
    def check(self, name: str, value: Any) -> None:
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"hyperparameter {name}={value!r} must be a module name (str) or None.")


@register
class FeatureNorm(Detector):
    """FeatureNorm of the block selected by NormRatio (Yu et al., CVPR 2023, arXiv:2212.02295).

    For a block output ``A`` with ``C`` channels over positions ``p`` (pixels; patch tokens for
    ViT/Swin/Mixer blocks, class/register tokens excluded)::

        FN_l(x)      = (1/C) * sum_c || ReLU(A_c) ||_2          (norm over positions)
        NormRatio_l  = mean_i FN_l(x_i) / FN_l(J(x_i))          (ID training images x_i)
        l*           = argmax_l NormRatio_l ;   score(x) = FN_{l*}(x)   (higher = more ID)

    ``J`` is the jigsaw of :mod:`normscore.detectors.engines.jigsaw` (``grid x grid`` tiles, permutation seeded by
    ``(seed, sample position)``), applied to the preprocessed batch and captured in the *same*
    forward pass as the batch through an input view, so each image is paired with its own
    jigsaw. Every candidate block of the adapter is measured in that one pass;
    ``block_report_`` keeps the whole table (block, norm_ratio, mean_id_norm,
    mean_jigsaw_norm) and ``block_`` the selection. ``block=`` forces a block (the table is
    still computed); ``max_fit_samples`` caps the number of images used for the ratios.

    ``on="msp"`` / ``"energy"``: the "selected norm" variant on top of a logit score. The
    penultimate feature ``h`` keeps its direction and takes the block norm as its magnitude,
    ``h' = FN_{l*}(x) * h / ||h||``; the score is MSP or energy of ``W h' + b``
    (computed as ``a * (z - b) + b`` with ``a = FN/||h||``, since ``z = W h + b``).
    """

    name = "featurenorm"
    shape_bound = frozenset({"logits", "blocks"})  # the penultimate enters only through its norm
    paper = "Yu et al., CVPR 2023, arXiv:2212.02295"
    formula = "mean_c ||ReLU(A_c)||_2 at l* = argmax_l mean_i FN_l(x_i)/FN_l(jigsaw(x_i))"
    needs_fit = True
    constraints = {
        "block": _OptionalName(),
        "grid": Interval(2, 32, integer=True),
        "seed": Interval(0, 2**62, integer=True),
        "max_fit_samples": Interval(1, math.inf, integer=True, allow_none=True),
        "on": OneOf(("none", "msp", "energy")),
    }
    search_space = {"on": ["none", "msp", "energy"]}

    def __init__(
        self,
        block: str | None = None,
        grid: int = 3,
        seed: int = 0,
        max_fit_samples: int | None = None,
        on: str = "none",
    ) -> None:
        super().__init__()
        self.block = block
        self.grid = grid
        self.seed = seed
        self.max_fit_samples = max_fit_samples
        self.on = on

    # ------------------------------------------------------------------ specs
    @property
    def view_name(self) -> str:
        return jigsaw_view(int(self.grid), int(self.seed))

    def capture_spec(self, adapter, stage):
        logit = self.on != "none"
        if stage == "fit":
            return CaptureSpec(logits=False, blocks=frozenset({(ALL_BLOCKS, _RED)}), views=frozenset({self.view_name}))
        if stage == "calibrate":
            blocks = {(self.block, _RED)} if self.block is not None else {(ALL_BLOCKS, _RED)}
            return CaptureSpec(logits=logit, penultimate=logit, blocks=frozenset(blocks))
        sel = getattr(self, "block_", None)
        if sel is None:
            raise NotFittedError("featurenorm is not fitted yet (no block selected). Call fit(model, id_loader).")
        return CaptureSpec(logits=logit, penultimate=logit, blocks=frozenset({(sel, _RED)}))

    # ------------------------------------------------------------------ fit
    _fit_state = (("_sums", "sum"), ("_count", "sum"))

    def _fit_begin(self, adapter) -> None:
        self._fit_adapter = adapter
        self._blocks: list[str] | None = None
        self._sums: torch.Tensor | None = None  # [L, 3]: sum ratio, sum id norm, sum jigsaw norm
        self._count = 0

    def _candidates(self, feats: Features) -> list[str]:
        view = self.view_name
        present = []
        for k in feats:
            key = parse_key(k)
            if key.view is None and key.block is not None and key.reduction == _RED and view_key(view, k) in feats:
                present.append(key.block)
        adapter = self._fit_adapter
        if adapter is not None and adapter.resolved:
            order = adapter.block_names
            present = [b for b in order if b in set(present)]
        if not present:
            raise AdapterError(
                "featurenorm found no candidate block outputs (with their jigsaw) in the fit features; "
                "the model has no candidate blocks. Pass normscore.Adapter(model, blocks=[...]) as adapter=."
            )
        if self.block is not None and self.block not in present:
            if adapter is not None and adapter.resolved:
                adapter.block(self.block)  # raises AdapterError listing the valid blocks
            raise AdapterError(f"block={self.block!r} is not a candidate block. Valid blocks: {present}.")
        return present

    def _fit_update(self, feats: Features) -> None:
        if self._blocks is None:
            self._blocks = self._candidates(feats)
            self._sums = torch.zeros(len(self._blocks), 3, dtype=torch.float64)
        n = feats.batch_size
        if self.max_fit_samples is not None:
            n = min(n, int(self.max_fit_samples) - self._count)
        if n <= 0:
            return
        view = self.view_name
        rows = []
        for b in self._blocks:
            k = block_key(b, _RED)
            fn = feats.require(k)[:n].double().cpu()
            fj = feats.require(view_key(view, k))[:n].double().cpu()
            rows.append(torch.stack([(fn / fj.clamp_min(_EPS)).sum(), fn.sum(), fj.sum()]))
        assert self._sums is not None
        self._sums += torch.stack(rows)
        self._count += n

    def _fit_end(self) -> None:
        if self._blocks is None or self._sums is None:
            raise InputError("featurenorm saw no fit samples; pass a loader with ID training data.")
        n = int(self._count)
        if n == 0:
            raise InputError("featurenorm saw no fit samples; pass a loader with ID training data.")
        means = self._sums / n
        report = [
            {
                "block": b,
                "norm_ratio": float(means[i, 0]),
                "mean_id_norm": float(means[i, 1]),
                "mean_jigsaw_norm": float(means[i, 2]),
            }
            for i, b in enumerate(self._blocks)
        ]
        best = max(range(len(report)), key=lambda i: report[i]["norm_ratio"])
        sel = self.block if self.block is not None else report[best]["block"]
        self.block_report_ = report
        self.block_ = sel
        self.norm_ratio_ = next(r["norm_ratio"] for r in report if r["block"] == sel)
        self.n_normratio_samples_ = n
        if self.on != "none":
            self.head_bias_ = self._fit_adapter.head_weight_bias()[1]
        self._fit_adapter = None

    # ------------------------------------------------------------------ score
    def score_features(self, feats: Features) -> torch.Tensor:
        sel = getattr(self, "block_", None)
        if sel is None:
            raise NotFittedError("featurenorm is not fitted yet (no block selected). Call fit(model, id_loader).")
        fn = feats.require(block_key(sel, _RED)).float()
        if self.on == "none":
            return fn
        h = feats.require("penultimate").float()
        z = feats.require("logits").float()
        b = self.head_bias_.to(z.device)
        a = fn / h.norm(dim=1).clamp_min(_EPS)
        z2 = a[:, None] * (z - b) + b
        if self.on == "msp":
            return torch.softmax(z2, dim=1).amax(dim=1)
        return torch.logsumexp(z2, dim=1)
