"""A model that arrives in train mode (what ``timm.create_model`` returns) is scored with eval
semantics on every path, and left bitwise as it was: flags, parameters, BatchNorm statistics,
``requires_grad`` and existing ``.grad`` values.

Paths: ``fit``/``score`` of every registered detector (also those that run the model
themselves: ODIN, LDG, GradNorm, FeatureNorm's jigsaw view, fusion), ``score_loader``, the hooked
``ScoringModule`` and the hook-free one eagerly, traced, exported and compiled.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from helpers import assert_unchanged, make_loader, snapshot
from torch import nn
from zoo_helpers import SMALL_DATA_HPARAMS

import normscore
from normscore.pipeline import ScoringModule, exportable, score_loader

SMALL = {**SMALL_DATA_HPARAMS, "ldg": {"n_components": 4}}
LOADER = make_loader(n=40, batch=10, size=32, classes=5)
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _create(name: str) -> normscore.Detector:
    return normscore.create(name, **SMALL.get(name, {}))


class _DropNet(nn.Module):
    """BatchNorm and a dropout module before the head: train mode changes every output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.5),
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _train_mode(model: nn.Module) -> nn.Module:
    """Train mode with non-trivial BN statistics and a populated ``.grad`` on every parameter."""
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    return model


def _timm_resnet() -> nn.Module:
    torch.manual_seed(0)
    return _train_mode(timm.create_model("resnet18", num_classes=5, drop_rate=0.5))


@pytest.mark.parametrize("name", normscore.list_detectors())
def test_fit_and_score_on_a_train_mode_model_use_eval_semantics(name):
    torch.manual_seed(0)
    model = _train_mode(_DropNet())
    ref_model = copy.deepcopy(model).eval()
    snap = snapshot(model)
    det = _create(name).fit(model, LOADER)
    s = det.score(X)
    assert_unchanged(model, snap)
    ref = _create(name).fit(ref_model, LOADER).score(X)
    assert torch.allclose(s, ref, rtol=1e-5, atol=1e-6), (name, (s - ref).abs().max())
    assert torch.equal(det.score(X), s)  # no state carried between calls (dropout is off)


def test_score_loader_on_a_train_mode_model():
    model = _timm_resnet()
    ds = normscore.DetectorSet(["energy", "mahalanobis"]).fit(model, LOADER)
    snap = snapshot(model)
    out = score_loader(ds, [X[:2], X[2:]], progress=False)
    assert_unchanged(model, snap)
    ref = ds.score(X)
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=1e-5, atol=1e-5), k


def _exportable_set(model: nn.Module) -> normscore.DetectorSet:
    names = [n for n in normscore.list_detectors() if exportable(normscore.create(n))]
    return normscore.DetectorSet([_create(n) for n in names]).fit(model, LOADER)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_every_scoring_module_path_on_a_train_mode_model():
    """Before the fix, the hook-free graph ran BatchNorm with batch statistics (scores off by up
    to thousands for mahalanobis) and updated the model's running statistics."""
    model = _timm_resnet()
    ds = _exportable_set(model)
    ref = ds.score(X)  # hook path: eval semantics (test_fit_and_score_on_a_train_mode_model_...)
    snap = snapshot(model)
    hooked = ScoringModule(model, ds)
    free = ScoringModule(model, ds, hook_free=True, example_input=X)
    assert hooked.training and free.training  # a new nn.Module is in train mode
    outs = {"hooks": hooked(X), "hook-free": free(X)}
    free.train()  # explicitly: train() must not switch the graph to training semantics
    outs["hook-free after .train()"] = free(X)
    outs["jit.trace"] = torch.jit.trace(free, X, strict=False, check_trace=False)(X)
    outs["export"] = torch.export.export(free, (X,)).module()(X)
    with torch.no_grad():
        ref_logits = copy.deepcopy(model).eval()(X)
    assert_unchanged(model, snap)
    for how, (logits, scores) in outs.items():
        assert torch.allclose(logits, ref_logits, atol=1e-5), how
        for k in ref:
            assert torch.allclose(scores[k], ref[k], rtol=1e-4, atol=1e-4), (how, k, (scores[k] - ref[k]).abs().max())


def test_compiled_hook_free_module_on_a_train_mode_model():
    model = _timm_resnet()
    ds = normscore.DetectorSet(["energy", "mahalanobis"]).fit(model, LOADER)
    ref = ds.score(X)
    free = ScoringModule(model, ds, hook_free=True, example_input=X)
    snap = snapshot(model)
    _, scores = torch.compile(free)(X)
    assert_unchanged(model, snap)
    for k in ref:
        assert torch.allclose(scores[k], ref[k], rtol=1e-4, atol=1e-4), k


def test_evaluate_accuracy_restores_each_modules_own_flag():
    """A helper that runs the model must not flatten mixed flags (e.g. frozen BatchNorm in eval
    inside a training model) into one: the old helper ended with ``model.train(was)``."""
    from normscore.training import evaluate_accuracy

    model = _train_mode(_DropNet())
    model.body[1].eval()  # a frozen BatchNorm layer
    snap = snapshot(model)
    ds = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)))
    acc = evaluate_accuracy(model, ds)
    assert_unchanged(model, snap)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(ds.tensors[0]).argmax(1)
    assert acc == float((ref == ds.tensors[1]).float().mean())
