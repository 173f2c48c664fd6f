"""The last step of a benchmark run: metrics (:func:`normscore.metrics.evaluate`) per OOD set,
their means over the near and far OOD groups, and the ID accuracy from the cached logits."""

from __future__ import annotations

import torch

from ..metrics import METRICS, evaluate, mean_metrics
from .config import SplitRef
from .plan import DetectorRun, short_error

__all__ = ["add_metrics", "id_accuracy"]


def id_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy on the labelled rows (``label >= 0``); NaN if none is labelled."""
    lab = labels >= 0
    return float((logits.argmax(1)[lab] == labels[lab]).double().mean()) if bool(lab.any()) else float("nan")


def add_metrics(runs: list[DetectorRun], ood_refs: list[SplitRef]) -> None:
    """Fill each working run's ``metrics``: one entry per OOD set (or its error), and ``near`` /
    ``far`` - the means of :data:`~normscore.metrics.METRICS` over a group, only when every set
    of the group has metrics."""
    groups = {g: [x.label for x in ood_refs if x.group == g] for g in ("near", "far")}
    for r in runs:
        if r.error is not None:
            continue
        s_id = r.scores["id"]
        for x in ood_refs:
            try:
                r.metrics[x.label] = evaluate(s_id, r.scores[x.label])
            except Exception as e:  # noqa: BLE001 - e.g. NaN scores
                r.metrics[x.label] = {"error": short_error(e)}
        for g, labels in groups.items():
            vals = [r.metrics[lb] for lb in labels if "auroc" in r.metrics.get(lb, {})]
            if labels and len(vals) == len(labels):
                r.metrics[g] = mean_metrics([{m: v[m] for m in METRICS} for v in vals])
