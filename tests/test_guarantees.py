"""Guarantees that hold for every registered detector: determinism, batch-size and batch-order
invariance, bitwise save/load, thread safety, and model hygiene after an exception mid-call.

Tolerance for invariance: scores from different batchings agree to 1e-5 relative (float32
GEMMs may pick different kernels for different batch sizes); everything else is bitwise.
"""

from __future__ import annotations

import threading

import pytest
import timm
import torch
import torchvision
from helpers import TinyCNN, assert_unchanged, make_loader, snapshot
from torch import nn
from zoo_helpers import SMALL_DATA_HPARAMS

import normscore
from normscore.errors import InputError

ALL = normscore.list_detectors()
#: small-data settings (tiny fits): neighbour banks need k <= N; LDG's subspace is capped
SMALL = {**SMALL_DATA_HPARAMS, "ldg": {"n_components": 4}}


def create(name: str) -> normscore.Detector:
    return normscore.create(name, **SMALL.get(name, {}))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyCNN()
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 3, 16, 16))  # non-trivial BN statistics
    return m.eval()


LOADER = make_loader(n=60, batch=20)
X = torch.randn(13, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _state_equal(a: dict, b: dict) -> None:
    assert a["params"] == b["params"]
    assert a["fitted"].keys() == b["fitted"].keys()
    for k in a["fitted"]:
        assert a["fitted"][k] == b["fitted"][k] or _deep_equal(a["fitted"][k], b["fitted"][k]), k
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k


def _deep_equal(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_deep_equal(x[k], y[k]) for k in x)
    if isinstance(x, list):
        return len(x) == len(y) and all(_deep_equal(u, v) for u, v in zip(x, y))
    return x == y


@pytest.mark.parametrize("name", ALL)
def test_fit_twice_gives_bitwise_identical_state(name, model):
    a = create(name).fit(model, LOADER).state_dict()
    b = create(name).fit(model, LOADER).state_dict()
    _state_equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_scores_invariant_to_batch_size_and_order(name, model):
    det = create(name).fit(model, LOADER)
    full = det.score(X)
    parts = torch.cat([det.score(X[i : i + 4]) for i in range(0, len(X), 4)])
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(parts, full, rtol=1e-5, atol=1e-5), name
    assert torch.allclose(det.score(X[perm]), full[perm], rtol=1e-5, atol=1e-5), name
    # the fit does not depend on the batch size either (same data, other batching)
    rebatched = make_loader(n=60, batch=7)
    again = create(name).fit(model, rebatched).score(X)
    assert torch.allclose(again, full, rtol=1e-4, atol=1e-4), name


@pytest.mark.parametrize("name", ALL)
def test_save_load_reproduces_scores_bitwise(name, model, tmp_path):
    det = create(name).fit(model, LOADER)
    det.save(tmp_path / "d.ns")
    back = normscore.load(tmp_path / "d.ns", model=model)
    assert torch.equal(back.score(X), det.score(X)), name
    assert back.get_params() == det.get_params()


def test_four_threads_equal_sequential_for_every_detector(model):
    dets = {n: create(n).fit(model, LOADER) for n in ALL}
    xs = [torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = {n: [d.score(x) for x in xs] for n, d in dets.items()}
    errors: list[BaseException] = []
    got: dict[int, dict[str, list[torch.Tensor]]] = {}

    def work(tid: int) -> None:
        try:
            out = {n: [] for n in dets}
            for _ in range(2):
                for n, d in dets.items():
                    for x in xs[tid:] + xs[:tid]:  # different order per thread
                        out[n].append(d.score(x))
            got[tid] = out
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    snap = snapshot(model)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for tid, out in got.items():
        order = list(range(tid, 4)) + list(range(tid))
        for n in dets:
            for r, s in enumerate(out[n]):
                assert torch.equal(s, expected[n][order[r % 4]]), (n, tid)
    assert_unchanged(model, snap)


ARCHS = {
    "timm-resnet18": (lambda: timm.create_model("resnet18", num_classes=5), 32),
    "timm-vit": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32), 32),
    "timm-convnext": (lambda: timm.create_model("convnext_atto", num_classes=5), 32),
    "tv-mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(num_classes=5), 32),
    "tv-densenet": (lambda: torchvision.models.densenet121(num_classes=5), 32),
    "tiny-cnn": (lambda: TinyCNN(num_classes=5), 16),
}


class _Armed:
    """A user hook that raises inside the forward pass when armed."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, module: nn.Module, args: tuple, out: object) -> None:
        if self.armed:
            raise RuntimeError("failure inside the forward pass")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_model_unchanged_after_exception_mid_call(arch):
    """For every detector: an exception raised *inside* the forward pass (after normscore's
    hooks are registered and the model is switched to eval) leaves no hooks and restores modes."""
    build, size = ARCHS[arch]
    torch.manual_seed(0)
    model = build()
    model.train()
    loader = make_loader(n=20, batch=10, size=size, classes=5)
    x = torch.randn(3, 3, size, size)
    boom = _Armed()
    leaf = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1]
    handle = leaf.register_forward_hook(boom)
    try:
        snap = snapshot(model)
        for name in ALL:
            det = create(name).fit(model, loader)
            boom.armed = True
            try:
                with pytest.raises(InputError, match="failure inside the forward pass"):
                    det.score(x)
            finally:
                boom.armed = False
            assert_unchanged(model, snap)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["separation", "ash", "fdbd", "vim", "klm"])
def test_score_time_caches_follow_the_model_and_the_fitted_state(name, tmp_path):
    """Score-time constants (normalised head, Gram matrix, null space, log templates) are cached
    per detector; they must follow in-place changes of the model's head, set_params, refits and
    loads: the scores always equal those of a freshly created detector."""
    torch.manual_seed(0)
    m = TinyCNN(num_classes=5).eval()
    loader = make_loader(n=40, batch=10, size=16, classes=5)
    x = torch.randn(6, 3, 16, 16)
    det = create(name).fit(m, loader)
    det.score(x)  # fills the caches
    with torch.no_grad():  # e.g. a fine-tuning step on the live model
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    det2 = create(name).fit(m, loader)
    if not det.needs_fit:  # fit-free: reads the live head, no refit needed
        assert torch.equal(det.score(x), det2.score(x))
    assert torch.equal(det.fit(m, loader).score(x), det2.score(x))
    if name == "vim":
        det.set_params(dim=4)
        assert torch.equal(det.score(x), create(name).set_params(dim=4).fit(m, loader).score(x))
    det.save(tmp_path / "d.ns")
    assert torch.equal(normscore.load(tmp_path / "d.ns", model=m).score(x), det.score(x))
