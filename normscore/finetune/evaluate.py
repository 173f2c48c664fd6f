"""Evaluate a trained classifier: accuracy (overall, many/medium/few-shot) and OOD metrics.

OOD scores come from the ordinary scoring path (:class:`normscore.DetectorSet`: one eval-mode
forward pass per batch, hooks removed afterwards), so what is measured here is exactly what a
user of ``normscore.create(name)`` gets. Metrics are :func:`normscore.evaluate` (higher score =
ID): ``auroc``, ``fpr95`` (ID positive: OOD accepted at 95% ID TPR), ``fpr95_oodpos`` (the
RNA/OE-code convention), ``aupr_in``/``aupr_out`` (average precision) and
``aupr_in_trapz``/``aupr_out_trapz`` (trapezoid rule, OpenOOD).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..detectors.dset import DetectorSet
from ..metrics import evaluate, mean_metrics
from ..taps import CaptureSpec, capture
from .longtail import shot_accuracy

__all__ = ["accuracy_report", "ood_report", "predict_scores"]


def _batches(dataset: object, batch_size: int):
    if isinstance(dataset, torch.Tensor):
        for i in range(0, dataset.shape[0], batch_size):
            yield dataset[i : i + batch_size], None
        return
    yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    dataset: torch.utils.data.Dataset | torch.Tensor,
    detectors: Sequence[str],
    *,
    batch_size: int = 512,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Scores ``{detector: [N]}``, predictions ``[N]`` and labels ``[N]`` (None if absent).

    Only fit-free detectors (e.g. ``msp``, ``energy``, ``penultimate_norm``, ``separation``)
    can be used here; they are attached to ``model`` without fitting.
    """
    ds = DetectorSet(list(detectors)).attach(model)
    for name, d in ds.detectors.items():
        if d.needs_fit:
            raise ValueError(f"detector {name!r} needs fitting; predict_scores takes fit-free detectors only")
    spec = ds.capture_spec("score") | CaptureSpec(logits=True)
    adapter = get_adapter(model)
    scores: dict[str, list[torch.Tensor]] = {k: [] for k in ds.detectors}
    preds, labels = [], []
    for x, y in _batches(dataset, batch_size):
        feats = capture(adapter, x, spec)
        for k, d in ds.detectors.items():
            scores[k].append(d.score_features(feats).cpu())
        preds.append(feats["logits"].argmax(1).cpu())
        if y is not None:
            labels.append(torch.as_tensor(y))
    out = {k: torch.cat(v) for k, v in scores.items()}
    return out, torch.cat(preds), (torch.cat(labels) if labels else None)


def accuracy_report(
    model: nn.Module,
    test_set: torch.utils.data.Dataset,
    train_counts: Sequence[int],
    *,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Top-1 accuracy on ``test_set`` with raw logits: overall and many/medium/few-shot
    (groups from the training counts, see :func:`~normscore.finetune.shot_groups`)."""
    _, preds, labels = predict_scores(model, test_set, ["msp"], batch_size=batch_size)
    if labels is None:
        raise ValueError("accuracy_report needs a labelled test set")
    return shot_accuracy(preds, labels, train_counts)


def ood_report(
    model: nn.Module,
    id_test: torch.utils.data.Dataset,
    ood_sets: Mapping[str, torch.utils.data.Dataset | torch.Tensor],
    detectors: Sequence[str],
    *,
    batch_size: int = 512,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{detector: {ood_set: metrics, ..., "mean": metrics averaged over the sets}}``."""
    id_scores, _, _ = predict_scores(model, id_test, detectors, batch_size=batch_size)
    per: dict[str, dict[str, dict[str, float]]] = {d: {} for d in id_scores}
    for name, ds in ood_sets.items():
        ood_scores, _, _ = predict_scores(model, ds, detectors, batch_size=batch_size)
        for d in id_scores:
            per[d][name] = evaluate(id_scores[d], ood_scores[d])
    for d in per:
        rows = [per[d][n] for n in ood_sets]
        per[d]["mean"] = mean_metrics(rows) if rows else {}
    return per
