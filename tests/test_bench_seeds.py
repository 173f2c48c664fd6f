"""Reproducible bench training and ``--seeds N`` (mean +- std over N trainings)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from bench_helpers import save_checkpoint

from normscore.bench.cli import main
from normscore.bench.seeds import merge_seed_results

TINY = ["--limit", "64", "--train-epochs", "1", "--detectors", "msp,energy,mahalanobis", "--no-plots", "--quiet"]


def _doc(seed: int, auroc: float, acc: float, error: str | None = None) -> dict:
    m = {"auroc": auroc, "fpr95": 1 - auroc}
    return {
        "train_seed": seed,
        "model": {"weights_sha256": str(seed)},
        "id": {"accuracy": acc},
        "detectors": {
            "energy": {"metrics": {"noise": dict(m), "far": dict(m)}, "params": {}, "error": None},
            "knn": {"metrics": {} if error else {"noise": dict(m)}, "params": {}, "error": error},
        },
        "timings": {"total": 1.0},
        "cpu_seconds": {"total": 2.0},
    }


def test_merge_gives_mean_sample_std_and_every_run():
    runs = [_doc(0, 0.8, 0.90), _doc(1, 0.9, 0.92), _doc(2, 0.7, 0.91, error="boom")]
    m = merge_seed_results(runs)
    assert m["train_seeds"] == [0, 1, 2]
    assert m["id"]["accuracy"] == pytest.approx(0.91) and m["id"]["accuracy_std"] == pytest.approx(0.01)
    e = m["detectors"]["energy"]
    assert e["metrics"]["noise"]["auroc"] == pytest.approx(0.8)
    assert e["metrics_std"]["noise"]["auroc"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert e["metrics_per_seed"]["1"]["noise"]["auroc"] == 0.9
    assert m["detectors"]["knn"]["error"] == "seed 2: boom"  # a failure in any run is reported
    assert m["timings"]["total"] == 3.0


def test_threads_do_not_change_the_trained_model_or_the_results(tmp_path):
    """Two fresh caches, --threads 1 and --threads 2: the same model file and results.csv."""
    outs = {}
    before = torch.get_num_threads()
    try:
        for t in (1, 2):
            out = tmp_path / f"out{t}"
            args = [*TINY, "--threads", str(t), "--out", str(out), "--cache-dir", str(tmp_path / f"cache{t}")]
            assert main(args) == 0
            r = json.loads((out / "results.json").read_text())
            model_file = r["model"]["training"]["checkpoint"]
            with open(model_file, "rb") as f:
                outs[t] = (f.read(), (out / "results.csv").read_text(), r)
    finally:
        torch.set_num_threads(before)
    (sd1, csv1, r1), (sd2, csv2, r2) = outs[1], outs[2]
    assert sd1 == sd2  # the model files, byte for byte
    assert r1["model"]["weights_sha256"] == r2["model"]["weights_sha256"]
    assert csv1 == csv2


def test_seeds_trains_n_models_and_reports_mean_and_std(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*TINY, "--seeds", "2", "--seed", "4", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    per = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (4, 5)]
    assert [p["train_seed"] for p in per] == [4, 5] and all(p["seed"] == 4 for p in per)
    assert per[0]["model"]["weights_sha256"] != per[1]["model"]["weights_sha256"]  # two trainings
    assert per[0]["id"]["test_size"] == per[1]["id"]["test_size"] == 64  # the same data
    merged = json.loads((out / "results.json").read_text())
    assert merged["train_seeds"] == [4, 5]
    vals = [p["detectors"]["energy"]["metrics"]["near"]["auroc"] for p in per]
    assert merged["detectors"]["energy"]["metrics"]["near"]["auroc"] == pytest.approx(np.mean(vals))
    assert merged["detectors"]["energy"]["metrics_std"]["near"]["auroc"] == pytest.approx(np.std(vals, ddof=1))
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["detector"] == "energy" and r["ood"] == "near (mean)")
    assert float(row["auroc_std"]) == pytest.approx(100 * np.std(vals, ddof=1), abs=0.01)  # percent
    assert "±" in text and "2 training seeds" in text
    # a single-seed run with the same training seed reproduces that seed's results exactly
    one = tmp_path / "one"
    assert main([*TINY, "--seed", "4", "--out", str(one), "--cache-dir", str(tmp_path / "c2")]) == 0
    assert (one / "results.csv").read_text() == (out / "seed-4" / "results.csv").read_text()


def test_seeds_needs_a_model_trained_here(tmp_path, capsys):
    ckpt = save_checkpoint(str(tmp_path / "m.pt"))
    args = ["--checkpoint", ckpt, "--seeds", "3", "--limit", "8", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--seeds N trains the model N times" in err and "--train-epochs" in err
