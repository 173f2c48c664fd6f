"""The JSON document of a benchmark run (``results.json``): configuration, versions, machine,
model, splits, per-detector parameters / search / metrics / timings."""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data import ImageSet
from ..detectors.registry import list_detectors
from ..metrics import METRICS
from .config import BenchConfig, SplitRef
from .models import LoadedModel
from .plan import DetectorRun, SplitPlan
from .result import BenchResult
from .search import CRITERION

__all__ = ["build_result"]


def _versions() -> dict[str, str]:
    out = {
        "normscore": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    for mod in ("torchvision", "timm", "faiss", "sklearn"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:  # noqa: BLE001 - optional
            out[mod] = "not installed"
    return out


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
        return _json_safe(v.item())
    return v


def _pseudo_validation(plan: SplitPlan, selection: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``validation`` entry of ``--val-ood pseudo``: held-out fit images vs their pseudo-OOD."""
    if not plan.pseudo_ood or not selection:
        return None
    ev = next(iter(selection.values()))
    return {
        "id": f"{ev['n_heldout']} held-out {plan.info.name}:{plan.train_split} fit images "
        f"(hash split, holdout {ev['holdout']}; the detectors of the selection were fitted on the other "
        f"{ev['n_fit']})",
        "ood": {"dataset": "pseudo", "split": "+".join(ev["kinds"]), "size": ev["n_heldout"]},
        "why": plan.val_reason,
        "criterion": ev["criterion"],
    }


def build_result(
    *,
    cfg: BenchConfig,
    plan: SplitPlan,
    runs: list[DetectorRun],
    started: str,
    device: torch.device,
    lm: LoadedModel,
    num_classes: int,
    id_accuracy: float,
    sets: dict[str, ImageSet],
    refs: dict[str, SplitRef],
    split_info: dict[str, dict[str, Any]],
    train_seed: int,
    cache_root: str | None,
    timings: dict[str, float],
    cpu: dict[str, float],
    selection: dict[str, Any] | None = None,
) -> BenchResult:
    """The :class:`BenchResult` of a finished run: its JSON document and the detectors' scores."""
    dets = {}
    for r in runs:
        dets[r.name] = {
            "mode": r.mode,
            "why_live": r.why_live or None,
            "params": r.params,
            "search": r.search or None,
            "metrics": r.metrics,
            "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
            "error": r.error,
            **({"not_applicable": True} if r.not_applicable else {}),
            **r.info,
        }
    splits = {}
    for k, ds in sets.items():
        ref = refs[k]
        rec = dict(split_info.get(k, {}))
        rec.update(
            {"label": ref.label, "dataset": ref.dataset, "split": ref.split, "group": ref.group, "size": len(ds)}
        )
        rec.setdefault("cache", "not captured")
        for z in ("rows_extracted", "model_batches", "resumed_rows"):
            rec.setdefault(z, 0)
        if "seconds" in rec:
            rec["seconds"] = round(rec["seconds"], 3)
        splits[k] = rec
    results = {
        "normscore_bench": 1,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": cfg.command,
        "config": asdict(cfg),
        "versions": _versions(),
        "machine": _machine(device),
        "model": lm.describe(),
        "id": {
            "dataset": cfg.id,
            "train_split": plan.train_split,
            "test_split": plan.test_split,
            "num_classes": num_classes,
            "fit_size": len(sets["fit"]),
            "live_fit_size": len(sets["live-fit"]),
            "test_size": len(sets["id"]),
            "accuracy": id_accuracy,
        },
        "ood": [
            {
                "label": r.label,
                "dataset": r.dataset,
                "split": r.split,
                "group": r.group,
                "size": len(sets[r.label]),
            }
            for r in plan.ood_refs
        ],
        "validation": (
            {
                "id": f"{len(sets['val-id'])} held-out {cfg.id}:{plan.train_split} images (disjoint from the fit images)",
                "ood": {
                    "dataset": plan.val_ref.dataset,
                    "split": plan.val_ref.split,
                    "size": len(sets["val-ood"]),
                },
                "why": plan.val_reason,
                "criterion": CRITERION,
            }
            if plan.val_ref is not None
            else _pseudo_validation(plan, selection)
        ),
        "selection": selection,
        "seed": cfg.seed,
        "train_seed": train_seed,
        "registered_detectors": list_detectors(),
        "detectors": dets,
        "splits": splits,
        "cache_dir": cache_root,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "metric_notes": dict(METRICS),
    }
    scores = {r.name: r.scores for r in runs if r.error is None}
    return BenchResult(_json_safe(results), scores, None)
