"""What normscore-bench shows a person: percent everywhere (table, CSV, plots, demo), CSV numbers
without float noise, clipped histogram values said, a chance line on the summary plots."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
import torch

from normscore.bench.report import _csv_text, clip_note, format_results, write_plots
from normscore.bench.runner import BenchResult
from normscore.demo import result_table
from normscore.metrics import evaluate


def _result(with_outliers: bool = True) -> BenchResult:
    rng = np.random.default_rng(0)
    s_id = rng.normal(1.0, 1.0, 400)
    s_a = rng.normal(0.0, 1.0, 300)
    s_b = rng.normal(-1.0, 1.0, 300)
    if with_outliers:
        s_a[:3] = [-1e6, np.inf, -np.inf]  # far outside the 0.5-99.5 percentile range
    labels = {"near-set": ("near", s_a), "far-set": ("far", s_b)}
    metrics = {
        lb: evaluate(torch.from_numpy(s_id), torch.from_numpy(np.nan_to_num(v))) for lb, (_, v) in labels.items()
    }
    metrics["near"], metrics["far"] = metrics["near-set"], metrics["far-set"]
    results = {
        "ood": [{"label": lb, "group": g, "size": len(v)} for lb, (g, v) in labels.items()],
        "detectors": {
            "energy": {"metrics": metrics, "params": {"temperature": 1.0}, "mode": "cached"},
            "msp": {"metrics": {k: {**m, "auroc": 0.0} for k, m in metrics.items()}, "params": {}, "mode": "cached"},
        },
        "id": {"dataset": "id-set", "test_size": 400, "accuracy": 0.8734567891},
        "model": {"name": "tiny"},
    }
    scores = {d: {"id": s_id, **{lb: v for lb, (_, v) in labels.items()}} for d in results["detectors"]}
    return BenchResult(results, scores, None)


def test_clip_note_counts_values_in_the_edge_bins():
    assert clip_note({"ID": np.array([0.0, 1.0]), "ood": np.array([0.5])}, 0.0, 1.0) is None
    note = clip_note({"ID": np.array([-5.0, 0.5, 9.0]), "ood": np.array([np.inf, 0.2, np.nan])}, 0.0, 1.0)
    assert "edge bins" in note and "ID 2 of 3" in note and "ood 1 of 3" in note and "1 NaN" in note


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """write_plots with savefig recording what each figure shows instead of writing PNGs."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    seen: dict[str, dict] = {}

    def record(fig, path, *a, **k):
        ax = fig.axes[0]
        texts = [t.get_text() for t in ax.texts]
        lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines}
        seen[str(path).rsplit("/", 1)[-1]] = {"texts": texts, "lines": lines, "xlim": ax.get_xlim(), "ax": ax}
        seen[str(path).rsplit("/", 1)[-1]]["xlabel"] = ax.get_xlabel()

    monkeypatch.setattr(Figure, "savefig", record)
    return lambda res: (write_plots(res, str(tmp_path), progress=False), seen)[1]


def test_histograms_say_when_values_are_clipped(drawn):
    seen = drawn(_result(with_outliers=True))
    note = " ".join(seen["hist_energy.png"]["texts"])
    assert "counted in the edge bins" in note
    n = re.search(r"near-set (\d+) of 300", note)
    assert n and int(n.group(1)) >= 3  # -1e6, +inf, -inf and the tail beyond the 99th percentile range
    res = _result()
    for d in res.scores.values():  # identical scores: the range covers them all, nothing is clipped
        for k in d:
            d[k] = np.full_like(d[k], 2.0)
    assert not any("edge bins" in t for t in drawn(res)["hist_energy.png"]["texts"])


def test_summary_and_roc_plots_are_in_percent_with_a_chance_line(drawn):
    seen = drawn(_result())
    summ = seen["summary_auroc.png"]
    assert summ["xlabel"] == "AUROC (%)" and summ["xlim"] == (0.0, 100.0)
    chance = [v for k, v in summ["lines"].items() if k.startswith("chance")]
    assert chance and set(chance[0][0]) == {50.0}
    bars = [p.get_width() for p in summ["ax"].patches]
    assert 0.0 in bars  # an AUROC of exactly 0 is drawn as 0, not dropped
    assert max(bars) > 1.0  # percent, not fractions
    roc = seen["roc_energy.png"]
    assert "%" in roc["xlabel"] and roc["xlim"] == (0.0, 100.0)
    assert any(k.startswith("chance") and v[0] == [0, 100] for k, v in roc["lines"].items())
    assert any(re.search(r"AUROC \d+\.\d%", k) for k in roc["lines"])


def test_csv_is_in_percent_without_float_noise_like_the_table():
    res = _result()
    rows = list(csv.DictReader(io.StringIO(_csv_text(res.results))))
    table = format_results(res.results)
    for r in rows:
        for k in ("auroc", "fpr95", "fpr95_oodpos", "detection_error", "id_accuracy"):
            assert re.fullmatch(r"\d{1,3}\.\d{2}", r[k]), (k, r[k])
    energy = next(r for r in rows if r["detector"] == "energy" and r["ood"] == "near-set")
    exact = res.results["detectors"]["energy"]["metrics"]["near-set"]["auroc"]
    assert energy["auroc"] == f"{100 * exact:.2f}" and energy["id_accuracy"] == "87.35"
    assert f"{100 * exact:.1f}" in table  # the same number, one decimal fewer


def test_demo_table_is_in_percent():
    g = torch.Generator().manual_seed(0)
    s_id = {"energy": torch.randn(50, generator=g) + 2}
    s_ood = {"noise": {"energy": torch.randn(40, generator=g)}}
    text = result_table(["energy"], s_id, s_ood)
    auroc = 100 * evaluate(s_id["energy"], s_ood["noise"]["energy"])["auroc"]
    assert f"{auroc:.1f}" in text and "in %" in text
    assert not re.search(r"\b0\.\d{3}\b", text)  # no fractions such as 0.938


def test_footer_lists_a_detector_that_failed_after_its_search_as_failed():
    """--search with a detector that fails once fitted (knn: k > bank size) crashed the whole run
    in footer_lines (KeyError on its empty params) before results.json was written."""
    from normscore.bench.report import footer_lines

    results = {
        "validation": {"id": "100 images", "ood": {"dataset": "v", "split": "test", "size": 10}, "criterion": "c"},
        "detectors": {
            "energy": {"search": [{"params": {"temperature": 1.0}, "val_auroc": 0.9}], "params": {"temperature": 1.0}},
            "knn": {"search": [{"params": {"k": 100}, "val_auroc": None}], "params": {}, "error": "k too large"},
        },
        "timings": {"total": 1.0},
        "splits": {},
    }
    lines = footer_lines(results)
    assert any(line.startswith("  energy: ") for line in lines)
    assert "FAILED knn: k too large" in lines and not any(line.startswith("  knn:") for line in lines)
