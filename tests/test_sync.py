"""Declared fit state (``Detector._fit_state``) and its one synchronisation over ranks
(normscore.detectors.sync, issue 13 item 5). The two-process equality with a single-process fit
is tests/test_distributed.py; here one gloo rank runs every collective path in-process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import normscore
from normscore.detectors.base import Detector
from normscore.detectors.registry import detector_class, list_detectors
from normscore.detectors.sync import REDUCTIONS, reduce, sync_state
from normscore.errors import InputError
from normscore.stats import RunningMoments


def test_every_single_pass_detector_declares_its_fit_state():
    for name in list_detectors():
        cls = detector_class(name)
        if cls.fit_mode == "single_pass":
            assert cls._fit_state, f"{name} accumulates fit state but declares no reduction"
            assert all(how in REDUCTIONS for _, how in cls._fit_state), name


def test_an_unknown_reduction_fails_when_the_class_is_defined():
    with pytest.raises(TypeError, match="unknown reduction 'mean'"):

        class Bad(Detector):  # noqa: F841
            _fit_state = (("_sums", "mean"),)


class _Acc:
    name = "acc"
    _fit_state = (("n", "sum"), ("total", "sum"), ("pair", "sum"), ("rows", "cat"), ("pos", "cat"), ("m", "moments"))
    _fit_order = "pos"

    def __init__(self) -> None:
        self.n, self.total = 3, 1.5
        self.pair = (torch.ones(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
        self.rows = [torch.tensor([[30.0], [10.0]]), torch.tensor([[20.0]])]
        self.pos = [torch.tensor([3, 1]), torch.tensor([2])]
        self.m = RunningMoments(1)
        self.m.update(torch.tensor([[1.0], [3.0]]))


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sync_is_a_no_op_in_one_process():
    a = _Acc()
    rows = a.rows
    sync_state(a)
    assert a.rows is rows and a.n == 3
    assert reduce(5, "sum") == 5


def test_sync_state_runs_every_reduction_under_a_process_group(one_rank):
    a = _Acc()
    sync_state(a)
    assert a.n == 3 and isinstance(a.n, int) and a.total == 1.5
    assert torch.equal(a.pair[0], torch.ones(2, dtype=torch.float64))
    # "cat" states are concatenated, then sorted by the declared positions
    assert a.pos[0].tolist() == [1, 2, 3] and a.rows[0].flatten().tolist() == [10.0, 20.0, 30.0]
    assert a.m.n == 2 and float(a.m.mean) == 2.0
    with pytest.raises(ValueError, match="unknown fit-state reduction"):
        reduce(1, "mean")
    a.n = None
    with pytest.raises(InputError, match="a rank saw no fit samples"):
        sync_state(a)


def test_a_fit_under_one_rank_equals_a_plain_fit(tmp_path):
    """Every declared state goes through the collectives (world size 1) and the fit is unchanged."""
    from helpers import TinyCNN

    torch.manual_seed(0)
    m = TinyCNN().eval()
    x, y = torch.randn(48, 3, 16, 16), torch.randint(0, 10, (48,))
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    xt = torch.randn(8, 3, 16, 16)
    names = ["mahalanobis", "knn", "vim", "react", "dice", "fdbd", "she", "klm", "tempscale", "featurenorm"]
    hp = {"knn": {"k": 3}}
    plain = {n: normscore.create(n, **hp.get(n, {})).fit(m, loader).score(xt) for n in names}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        synced = {n: normscore.create(n, **hp.get(n, {})).fit(m, loader).score(xt) for n in names}
    finally:
        dist.destroy_process_group()
    for n in names:
        torch.testing.assert_close(synced[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
