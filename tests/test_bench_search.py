"""The one "best configuration by validation AUROC" rule of ``--search`` and the near/far means."""

from __future__ import annotations

import numpy as np

from normscore.bench.config import SplitRef
from normscore.bench.plan import DetectorRun
from normscore.bench.score import add_metrics
from normscore.bench.search import best_by_val_auroc, grid
from normscore.metrics import METRICS, evaluate


def _scores(auroc_shift: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(auroc_shift, 1.0, 200), rng.normal(0.0, 1.0, 200)


def test_best_is_highest_auroc_and_first_of_ties() -> None:
    shifts = {"a": 0.5, "b": 2.0, "c": 2.0, "d": 1.0}
    configs = [{"name": n} for n in shifts]
    record: list[dict] = []
    best = best_by_val_auroc(configs, lambda c: (*_scores(shifts[c["name"]]), c["name"]), record)
    assert best == (1, "b")  # "c" ties with "b": the first in grid order wins
    assert [r["params"] for r in record] == configs
    aucs = [r["val_auroc"] for r in record]
    assert aucs[1] == aucs[2] == max(aucs)


def test_non_finite_scores_never_win_and_all_non_finite_is_none() -> None:
    s_id, s_ood = _scores(1.0)
    bad = s_id.copy()
    bad[0] = np.nan
    record: list[dict] = []
    best = best_by_val_auroc(
        [{"i": 0}, {"i": 1}], lambda c: (bad, s_ood, 0) if c["i"] == 0 else (s_id, s_ood, 1), record
    )
    assert best == (1, 1) and np.isnan(record[0]["val_auroc"])
    assert best_by_val_auroc([{}], lambda c: (bad, s_ood, None), []) is None


def test_grid_order() -> None:
    assert grid({}) == [{}]
    assert grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]


def test_group_means_only_when_every_set_of_the_group_has_metrics() -> None:
    rng = np.random.default_rng(1)
    refs = [SplitRef("n1", "d", "s", "near"), SplitRef("n2", "d", "s", "near"), SplitRef("f1", "d", "s", "far")]
    r = DetectorRun("x", scores={"id": rng.normal(1, 1, 50), "n1": rng.normal(0, 1, 40), "n2": rng.normal(0, 1, 30)})
    r.scores["f1"] = np.full(20, np.nan)  # evaluate fails: the far group has no mean
    add_metrics([r], refs)
    want = {
        m: (evaluate(r.scores["id"], r.scores["n1"])[m] + evaluate(r.scores["id"], r.scores["n2"])[m]) / 2
        for m in METRICS
    }
    assert list(r.metrics["near"]) == list(METRICS)  # no n_id / n_ood counts in a group mean
    assert np.allclose([r.metrics["near"][m] for m in METRICS], [want[m] for m in METRICS], rtol=0, atol=1e-12)
    assert "error" in r.metrics["f1"] and "far" not in r.metrics
