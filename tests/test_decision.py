"""The calibrated Decision: its uncertainty (binomial interval of the achieved TPR) and the
warnings for a held-out set too small for it and for fit labels that leave classes empty."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TinyCNN, make_loader
from scipy.stats import beta
from torch import nn

import normscore
from normscore import io as nio
from normscore.detectors.decision import Decision, held_out_needed
from normscore.errors import CalibrationWarning


def _clopper_pearson(k: int, n: int) -> tuple[float, float]:
    lo = beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def test_decision_stores_the_exact_binomial_interval_of_the_achieved_tpr():
    scores = torch.randn(400, generator=torch.Generator().manual_seed(0))
    d = Decision.calibrate(scores, 0.9)
    k = int((scores >= d.threshold).sum())
    assert d.n == 400 and d.achieved_tpr == k / 400
    lo, hi = _clopper_pearson(k, 400)
    assert d.tpr_low == pytest.approx(lo, rel=1e-9) and d.tpr_high == pytest.approx(hi, rel=1e-9)
    assert d.tpr_low < d.achieved_tpr < d.tpr_high
    assert set(d.to_dict()) == {"threshold", "tpr", "n", "achieved_tpr", "tpr_low", "tpr_high"}


def test_a_small_held_out_set_warns_and_its_interval_is_wide():
    loader = make_loader(n=270, batch=30)  # calibration=0.1 holds out 27 samples
    torch.manual_seed(0)
    with pytest.warns(CalibrationWarning, match=r"only 27 held-out ID samples.*at least \d+ held-out"):
        det = normscore.create("mahalanobis").fit(TinyCNN().eval(), loader)
    d = det.decision
    assert d.n == 27 and d.tpr_high - d.tpr_low > 0.15


def test_the_warning_starts_exactly_where_the_interval_gets_too_wide():
    n = held_out_needed(0.95)
    assert 100 < n < 200  # the ID rejection rate may double below ~140 samples
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        for m in (n, n + 1, 5 * n):
            Decision.calibrate(torch.linspace(0, 1, m), 0.95)
    with pytest.warns(CalibrationWarning):
        Decision.calibrate(torch.linspace(0, 1, n - 1), 0.95)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        Decision.calibrate(torch.linspace(0, 1, 5), 0.95, warn=False)


def test_fit_labels_that_leave_head_classes_empty_warn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000)).eval()
    loader = make_loader(n=300, batch=50, classes=55)
    with pytest.warns(CalibrationWarning, match=r"mahalanobis: only 55 of 1000 head classes have fit samples"):
        normscore.create("mahalanobis").fit(model, loader, calibration=0.0)
    with pytest.warns(CalibrationWarning, match=r"rmds, she: only 55 of 1000"):
        normscore.DetectorSet(["rmds", "she", "energy"]).fit(model, loader, calibration=0.0)
    full = [(x, torch.arange(len(x)) % 10) for x, _ in make_loader(n=40, batch=20)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        normscore.create("mahalanobis").fit(TinyCNN().eval(), full, calibration=0.0)  # every class present


def test_files_saved_before_the_interval_existed_still_load(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        det = normscore.create("energy").fit(model, make_loader(n=40, batch=20))
    p = tmp_path / "d.ns"
    det.save(p)
    kind, state = nio.loads(p.read_bytes())
    dec = state["fitted"]["decision_"]["__decision__"]
    old = {k: v for k, v in dec.items() if k not in ("tpr_low", "tpr_high")}
    state["fitted"]["decision_"]["__decision__"] = old
    p.write_bytes(nio.dumps(kind, state))
    loaded = normscore.load(p, model=model)
    assert loaded.decision == det.decision  # the interval is recomputed from n and achieved_tpr
    assert Decision(**old) == det.decision
