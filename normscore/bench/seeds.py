"""``normscore-bench --seeds N``: N trainings of the model, one benchmark each, mean ± std per cell.

Run ``i`` trains the model with seed ``seed + i`` (initialisation, data order, augmentation);
the data (fit, test and OOD subsets) stays the one chosen by ``--seed``, so the spread is the
spread over training runs - OpenOOD v1.5 reports three training runs the same way. Each run's
complete outputs are written to ``<out>/seed-<s>/``; the merged document keeps every run's
metrics and adds, per detector and cell, the mean and the sample standard deviation (``ddof=1``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

__all__ = ["merge_seed_results"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def merge_seed_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results document from the documents of runs that differ only in the training seed.

    ``detectors[name]["metrics"]`` holds the means, ``["metrics_std"]`` the standard deviations
    and ``["metrics_per_seed"]`` every run's value; a detector that failed in any run keeps
    that run's error. ``id.accuracy`` / ``id.accuracy_std`` likewise.
    """
    if not runs:
        raise ValueError("no runs to merge")
    out = copy.deepcopy(runs[0])
    seeds = [int(r["train_seed"]) for r in runs]
    out["train_seeds"] = seeds
    out["train_seed"] = None
    out["model"] = {**out["model"], "per_seed": [r["model"] for r in runs]}
    accs = [float(r["id"]["accuracy"]) for r in runs]
    out["id"]["accuracy"], out["id"]["accuracy_std"] = _mean_std(accs)
    out["id"]["accuracy_per_seed"] = accs
    for name, d in out["detectors"].items():
        per = [r["detectors"].get(name, {"error": "missing in this run"}) for r in runs]
        errors = [f"seed {s}: {p['error']}" for s, p in zip(seeds, per) if p.get("error")]
        if errors:
            d["error"] = "; ".join(errors)
            d["metrics"], d["metrics_std"] = {}, {}
            continue
        means: dict[str, dict[str, float]] = {}
        stds: dict[str, dict[str, float]] = {}
        for label, m in per[0]["metrics"].items():
            if "error" in m or any("error" in p["metrics"].get(label, {"error": 1}) for p in per):
                means[label] = {"error": next(p["metrics"][label].get("error", "") for p in per)}
                continue
            means[label], stds[label] = {}, {}
            for k in m:
                means[label][k], stds[label][k] = _mean_std([float(p["metrics"][label][k]) for p in per])
        d["metrics"], d["metrics_std"] = means, stds
        d["metrics_per_seed"] = {str(s): p["metrics"] for s, p in zip(seeds, per)}
        d["params_per_seed"] = {str(s): p.get("params") for s, p in zip(seeds, per)}
    out["timings"] = {k: round(sum(float(r["timings"].get(k, 0.0)) for r in runs), 3) for k in runs[0]["timings"]}
    out["cpu_seconds"] = {
        k: round(sum(float(r["cpu_seconds"].get(k, 0.0)) for r in runs), 3) for k in runs[0]["cpu_seconds"]
    }
    return out
