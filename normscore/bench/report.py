"""Outputs of ``normscore-bench``: terminal table, ``results.csv``, ``results.json``,
``scores.npz`` and PNG plots.

* **table** - rows: detectors; per OOD set ``AUROC`` and ``fpr95`` in percent, then the near-
  and far-OOD means and the ID accuracy. ``fpr95`` is the ID-positive FPR at 95 % TPR: the
  share of OOD images accepted by the threshold that keeps 95 % of the ID test images (lower is
  better). OpenOOD v1.5's OOD-positive variant is ``fpr95_oodpos`` in the CSV/JSON.
* **results.csv** - one row per (detector, OOD set or group mean) with every metric of
  :data:`normscore.metrics.METRICS` (``aupr_in``/``aupr_out`` = average precision,
  ``aupr_in_trapz``/``aupr_out_trapz`` = OpenOOD's trapezoid AUPR) and the ID accuracy in
  percent, rounded to 2 decimals (the table's scale, one more decimal; OpenOOD's CSVs use the
  same), the detector's hyperparameters (JSON). ``results.json`` keeps the exact fractions.
* **results.json** - the whole run: versions, machine, model (name, weights SHA-256, training
  recipe), data sets and sizes, seeds, hyperparameters (and the search trace), metrics,
  timings, cache use.
* **scores.npz** - the raw scores, ``"<detector>/<split>"`` (split ``id`` = ID test).
* **plots/** - ``hist_<detector>.png`` (ID vs each OOD set; the range is the 0.5-99.5
  percentile of all scores, values outside it are counted into the edge bins and a note in the
  panel says how many), ``roc_<detector>.png`` (ROC curves in %, ID positive, with the chance
  diagonal) and ``summary_auroc.png`` (near/far mean AUROC per detector in %, with the 50 %
  chance line). matplotlib is imported only here, with the headless ``Agg`` backend.

Every metric a person reads (table, plots, ``python -m normscore.demo``) is in percent.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import numpy as np

from ..files import atomic_write
from ..metrics import METRICS as METRIC_DEFINITIONS
from ..progress import progress_bar
from .result import BenchResult

__all__ = ["clip_note", "format_results", "write_csv", "write_json", "write_outputs", "write_plots"]

METRICS = tuple(METRIC_DEFINITIONS)  # the results.csv metric columns, in this order


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{100.0 * float(v):.1f}"


def _columns(results: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, kind)`` of the column groups: OOD sets, then near/far means."""
    cols = [(o["label"], o["group"]) for o in results["ood"]]
    groups = {o["group"] for o in results["ood"]}
    for g in ("near", "far"):
        if g in groups:
            cols.append((g, "mean"))
    return cols


def _cell(det: dict[str, Any], label: str, metric: str) -> str:
    """A metric in percent; ``mean±std`` for runs merged over training seeds (``--seeds``)."""
    if det.get("not_applicable"):
        return "n/a"
    if det.get("error"):
        return "err"
    m = det["metrics"].get(label, {})
    if "error" in m:
        return "err"
    std = det.get("metrics_std", {}).get(label, {}).get(metric)
    return _pct(m.get(metric)) + ("" if std is None else f"±{_pct(std)}")


def _accuracy(results: dict[str, Any]) -> str:
    idd = results["id"]
    std = idd.get("accuracy_std")
    return _pct(idd["accuracy"]) + ("" if std is None else f"±{_pct(std)}")


def format_results(results: dict[str, Any], fmt: str = "table") -> str:
    """The results as ``table`` (aligned text), ``markdown``, ``csv`` or ``json``."""
    if fmt == "json":
        return json.dumps(results, indent=1, sort_keys=False)
    if fmt == "csv":
        return _csv_text(results)
    cols = _columns(results)
    dets = results["detectors"]
    acc = _accuracy(results)
    names = list(dets)
    heads = [(lbl if kind != "mean" else f"{lbl} mean") for lbl, kind in cols]
    if fmt == "markdown":
        header = ["detector"] + [f"{h} {m}" for h in heads for m in ("AUROC", "fpr95")] + ["ID acc"]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for n in names:
            row = [n] + [_cell(dets[n], lbl, m) for lbl, _ in cols for m in ("auroc", "fpr95")] + [acc]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    w0 = max(8, *(len(n) for n in names)) if names else 8
    cells = {n: [(_cell(dets[n], lbl, "auroc"), _cell(dets[n], lbl, "fpr95")) for lbl, _ in cols] for n in names}
    wa = max([5, *(len(c[0]) for n in names for c in cells[n])])  # AUROC sub-column
    wf = max([5, *(len(c[1]) for n in names for c in cells[n])]) + 1  # fpr95 sub-column, one space before it
    widths = [max(len(h), wa + wf) for h in heads]
    wacc = max(6, len(acc))
    top = " " * w0
    sub = "detector".ljust(w0)
    for h, w in zip(heads, widths):
        top += "  " + h.center(w)
        sub += "  " + "AUROC".rjust(w - wf) + "fpr95".rjust(wf)
    top += "  " + "ID".rjust(wacc)
    sub += "  " + "acc".rjust(wacc)
    out = [top.rstrip(), sub, "-" * len(sub)]
    for n in names:
        line = n.ljust(w0)
        for (a, f), w in zip(cells[n], widths):
            line += "  " + a.rjust(w - wf) + f.rjust(wf)
        line += "  " + acc.rjust(wacc)
        out.append(line)
    return "\n".join(out)


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Header and footer lines printed around the table."""
    m = results["model"]
    idd = results["id"]
    oods = ", ".join(f"{o['label']} ({o['size']}, {o['group']})" for o in results["ood"])
    lines = [
        f"ID {idd['dataset']} ({idd['test_size']} test images, detectors fitted on {idd['fit_size']} "
        f"{idd['train_split']} images) - model {m['name']} ({m['weights']}, weights sha256 "
        f"{m['weights_sha256'][:12]}), ID accuracy {_accuracy(results)}%",
        f"OOD: {oods}",
        "AUROC and fpr95 in %. fpr95 = ID-positive FPR at 95% TPR: share of OOD images accepted by the "
        "threshold that keeps 95% of ID images (lower is better); fpr95_oodpos (OpenOOD v1.5) is in results.csv.",
    ]
    if results.get("train_seeds"):
        seeds = results["train_seeds"]
        lines.insert(
            1,
            f"mean ± std (sample, ddof=1) over {len(seeds)} training seeds {seeds} on the same data; the weights "
            "hash shown is the first seed's, every run's outputs are in seed-<s>/",
        )
    return lines


def footer_lines(results: dict[str, Any]) -> list[str]:
    out = []
    # a detector that failed after its search has no chosen parameters: it is listed under FAILED
    searched = {n: d for n, d in results["detectors"].items() if d.get("search") and not d.get("error")}
    if searched:
        v = results["validation"]
        out.append(
            f"search: {v['id']} vs {v['ood']['dataset']}:{v['ood']['split']} ({v['ood']['size']}); chosen by "
            f"{v['criterion']}:"
        )
        for n, d in searched.items():
            chosen = {k: d["params"][k] for k in d["search"][0]["params"]}
            best = max((s["val_auroc"] for s in d["search"] if s["val_auroc"] is not None), default=None)
            out.append(f"  {n}: {json.dumps(chosen)} (val AUROC {_pct(best)})")
    live = [n for n, d in results["detectors"].items() if d.get("mode") == "live" and not d.get("error")]
    if live:
        out.append(f"live (model passes of their own): {', '.join(live)}")
    for n, d in results["detectors"].items():
        if d.get("error"):
            out.append(f"{'not applicable' if d.get('not_applicable') else 'FAILED'} {n}: {d['error']}")
    t = results["timings"]
    out.append(
        "time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in t.items())
        + "; features: "
        + ", ".join(
            f"{s['label']} {s.get('cache', '-')}"
            for s in results["splits"].values()
            if s.get("cache", "not captured") != "not captured"
        )
    )
    return out


# ---------------------------------------------------------------------------------------------
# files


def _csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    groups = {o["label"]: o["group"] for o in results["ood"]}
    sizes = {o["label"]: o["size"] for o in results["ood"]}
    for name, d in results["detectors"].items():
        params = json.dumps(d.get("params") or {}, sort_keys=True)
        targets = [o["label"] for o in results["ood"]] + [g for g in ("near", "far") if g in d.get("metrics", {})]
        for t in targets:
            m = d.get("metrics", {}).get(t, {})
            row = {
                "detector": name,
                "ood": t if t in groups else f"{t} (mean)",
                "group": groups.get(t, t),
                **{k: m.get(k) for k in METRICS},
                "n_id": results["id"]["test_size"],
                "n_ood": sizes.get(t),
                "id_accuracy": results["id"]["accuracy"],
                "mode": d.get("mode"),
                "params": params,
                "error": d.get("error") or m.get("error"),
            }
            if "train_seeds" in results:  # --seeds: the spread of each metric over the trainings
                sd = d.get("metrics_std", {}).get(t, {})
                row.update({f"{k}_std": sd.get(k) for k in METRICS})
                row["id_accuracy_std"] = results["id"].get("accuracy_std")
            rows.append(row)
    return rows


_CSV_FIELDS = [
    "detector",
    "ood",
    "group",
    *METRICS,
    "n_id",
    "n_ood",
    "id_accuracy",
    "mode",
    "params",
    "error",
]


_CSV_PERCENT = frozenset((*METRICS, "id_accuracy"))


def _csv_value(key: str, v: Any) -> Any:
    """Metrics and accuracy as percent with 2 decimals (``93.81``, not ``0.9381234567``)."""
    if v is None:
        return ""
    if key.removesuffix("_std") in _CSV_PERCENT and isinstance(v, (int, float, np.floating)):
        return f"{100.0 * float(v):.2f}" if np.isfinite(v) else ""
    return v


def _csv_text(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    fields = list(_CSV_FIELDS)
    if "train_seeds" in results:
        fields[fields.index("n_id") : fields.index("n_id")] = [f"{k}_std" for k in METRICS]
        fields.insert(fields.index("id_accuracy") + 1, "id_accuracy_std")
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in _csv_rows(results):
        w.writerow({k: _csv_value(k, v) for k, v in r.items()})
    return buf.getvalue()


def write_csv(res: BenchResult, out: str) -> str:
    path = os.path.join(out, "results.csv")
    atomic_write(path, _csv_text(res.results))
    return path


def write_json(res: BenchResult, out: str) -> str:
    path = os.path.join(out, "results.json")
    atomic_write(path, json.dumps(res.results, indent=1) + "\n")
    return path


def write_scores(res: BenchResult, out: str) -> str:
    path = os.path.join(out, "scores.npz")
    arrays = {f"{d}/{k}": np.asarray(v, dtype=np.float32) for d, s in res.scores.items() for k, v in s.items()}
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return path


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def clip_note(series: dict[str, np.ndarray], lo: float, hi: float) -> str | None:
    """The histogram note for values drawn in the edge bins: below ``lo`` / above ``hi`` (and
    +-inf) are clipped into the first / last bin; NaN is not drawn. ``None`` when nothing is."""
    parts, missing = [], 0
    for label, v in series.items():
        v = np.asarray(v, dtype=np.float64)
        n = int(np.count_nonzero(v < lo) + np.count_nonzero(v > hi))
        missing += int(np.count_nonzero(np.isnan(v)))
        if n:
            parts.append(f"{label} {n} of {v.size}")
    out = []
    if parts:
        out.append(f"values outside {lo:.4g} .. {hi:.4g}, counted in the edge bins:")
        out += [", ".join(parts[i : i + 4]) for i in range(0, len(parts), 4)]
    if missing:
        out.append(f"{missing} NaN scores not drawn")
    return "\n".join(out) or None


def write_plots(res: BenchResult, out: str, *, progress: bool | None = None) -> list[str]:
    """Histogram and ROC PNGs per detector and a summary bar chart; returns the paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..metrics import roc_curve

    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    results = res.results
    labels = [o["label"] for o in results["ood"]]
    colors = plt.get_cmap("tab10")
    paths = []
    ok = [n for n in res.scores if not results["detectors"][n].get("error")]
    bar = progress_bar(total=len(ok) + 1, desc="plots", enabled=progress, unit="det")
    try:
        for name in ok:
            s = res.scores[name]
            allv = np.concatenate([s["id"], *(s[lb] for lb in labels)])
            allv = allv[np.isfinite(allv)]
            if allv.size == 0:
                bar.update(1)
                continue
            lo, hi = np.percentile(allv, [0.5, 99.5])
            if not hi > lo:
                lo, hi = lo - 0.5, hi + 0.5
            bins = np.linspace(lo, hi, 61)
            series = {"ID": s["id"], **{lb: s[lb] for lb in labels}}
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            ax.hist(
                np.clip(s["id"], lo, hi),
                bins=bins,
                density=True,
                color="0.6",
                alpha=0.6,
                label=f"ID ({results['id']['dataset']})",
            )
            for i, lb in enumerate(labels):
                ax.hist(
                    np.clip(s[lb], lo, hi),
                    bins=bins,
                    density=True,
                    histtype="step",
                    lw=1.4,
                    color=colors(i % 10),
                    label=lb,
                )
            note = clip_note(series, lo, hi)
            if note:
                ax.annotate(  # under the x label, where it hides no bar
                    note, (0, 0), xycoords="axes fraction", xytext=(0, -32), textcoords="offset points",
                    ha="left", va="top", fontsize=7, color="0.3",
                )  # fmt: skip
            ax.set_xlabel(f"{name} score (higher = more in-distribution)")
            ax.set_ylabel("density")
            ax.set_title(f"{name}: ID vs OOD score histograms")
            ax.legend(fontsize=8)
            fig.tight_layout()
            p = os.path.join(pdir, f"hist_{_safe(name)}.png")
            fig.savefig(p)
            plt.close(fig)
            paths.append(p)
            fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
            for i, lb in enumerate(labels):
                if not (np.isfinite(s["id"]).all() and np.isfinite(s[lb]).all()):
                    continue
                fpr, tpr, _ = roc_curve(s["id"], s[lb])
                auc = results["detectors"][name]["metrics"].get(lb, {}).get("auroc")
                ax.plot(100 * fpr, 100 * tpr, lw=1.4, color=colors(i % 10), label=f"{lb} (AUROC {_pct(auc)}%)")
            ax.plot([0, 100], [0, 100], ls=":", color="0.5", lw=1, label="chance (AUROC 50%)")
            ax.set_xlim(0, 100)
            ax.set_ylim(0, 100)
            ax.set_xlabel("OOD accepted (FPR, %)")
            ax.set_ylabel("ID accepted (TPR, %)")
            ax.set_title(f"{name}: ROC, ID positive")
            ax.legend(fontsize=8, loc="lower right")
            fig.tight_layout()
            p = os.path.join(pdir, f"roc_{_safe(name)}.png")
            fig.savefig(p)
            plt.close(fig)
            paths.append(p)
            bar.update(1)
        groups = [g for g in ("near", "far") if any(o["group"] == g for o in results["ood"])]
        if ok:
            fig, ax = plt.subplots(figsize=(7, 0.35 * len(ok) + 1.5), dpi=100)
            y = np.arange(len(ok))
            keys = groups or labels[:1]
            h = 0.8 / max(len(keys), 1)
            for j, g in enumerate(keys):
                vals = [results["detectors"][n]["metrics"].get(g, {}).get("auroc") for n in ok]
                vals = [np.nan if v is None else 100.0 * v for v in vals]
                ax.barh(y + j * h, vals, height=h, label=f"{g} mean" if groups else g, color=colors(j))
            ax.axvline(50.0, ls="--", color="0.3", lw=1, label="chance (50%)")
            ax.set_yticks(y + h * (len(keys) - 1) / 2, ok)
            ax.invert_yaxis()
            ax.set_xlim(0.0, 100.0)
            ax.set_xlabel("AUROC (%)")
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the bars
            ax.set_title(f"{results['model']['name']} on {results['id']['dataset']}")
            fig.tight_layout()
            p = os.path.join(pdir, "summary_auroc.png")
            fig.savefig(p)
            plt.close(fig)
            paths.append(p)
        bar.update(1)
    finally:
        bar.close()
    return paths


def write_outputs(res: BenchResult, out: str, *, plots: bool = True, progress: bool | None = None) -> None:
    """Write ``results.csv``, ``results.json``, ``scores.npz``, ``table.txt`` and (``plots``) PNGs."""
    os.makedirs(out, exist_ok=True)
    pdir = os.path.join(out, "plots")
    if os.path.isdir(pdir):  # plots of an earlier run in the same folder would mislead
        for f in os.listdir(pdir):
            if f.endswith(".png") and (f.startswith(("hist_", "roc_")) or f == "summary_auroc.png"):
                os.remove(os.path.join(pdir, f))
    write_csv(res, out)
    write_scores(res, out)
    atomic_write(
        os.path.join(out, "table.txt"),
        "\n".join([*summary_lines(res.results), "", format_results(res.results), "", *footer_lines(res.results)])
        + "\n",
    )
    if plots:
        try:
            res.results["plots"] = [os.path.relpath(p, out) for p in write_plots(res, out, progress=progress)]
        except ImportError:
            res.results["plots"] = "matplotlib is not installed (pip install normscore[data]); no plots"
    write_json(res, out)
