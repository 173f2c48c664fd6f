"""The zoo through the public API: metadata, search spaces that really change the scores, one
shared pass (DetectorSet) equal to each detector alone, batch-size invariance, persistence and
errors. (Model hygiene and the sign convention are tested for every registered detector in
test_detector_api.py.)"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from helpers import TinyCNN, make_loader
from zoo_helpers import ZOO, FeatNet, create_small, features_of, gaussians

import normscore
from normscore.errors import InputError
from normscore.taps import Features

CLASS_CONDITIONAL = {"mahalanobis", "rmds", "she", "tempscale"}


def test_zoo_is_registered_with_metadata():
    names = normscore.list_detectors()
    assert set(ZOO) <= set(names)
    assert set(normscore.list_detectors(needs_labels=True)) & set(ZOO) == CLASS_CONDITIONAL
    assert set(normscore.list_detectors(needs_gradients=True)) & set(ZOO) == {"odin"}
    for name in ZOO:
        cls = normscore.detector_class(name)
        info = cls.info()
        assert info["paper"] and info["formula"], name
        doc = inspect.getdoc(cls)
        assert doc and len(doc) > 150, name
        # the docstring names the venue and the arXiv id (or says there is none) like `paper`
        m = re.search(r"arXiv:(\d{4}\.\d{4,5})", info["paper"])
        assert (m and m.group(1) in doc) or "no arXiv" in doc, name
        sig = inspect.signature(cls.__init__)
        for p in list(sig.parameters.values())[1:]:
            assert p.kind == p.POSITIONAL_OR_KEYWORD and p.default is not p.empty, (name, p.name)
            assert p.annotation is not p.empty, (name, p.name)
        for hp, values in info["search_space"].items():
            assert len(values) >= 2 and len(set(map(repr, values))) == len(values), (name, hp)
            for v in values:
                normscore.create(name, **{hp: v})  # every value passes the constraints


# ---------------------------------------------------------------------------------------------
# every hyperparameter of every search space changes the scores


@pytest.fixture(scope="module")
def feat_problem():
    torch.manual_seed(0)
    model = FeatNet(32, 10, relu=True).eval()
    x, y = gaussians(1200, 32, 10, seed=3, sep=1.5, offset=0.5)
    xt, _ = gaussians(80, 32, 10, seed=4, sep=3.0, offset=0.0)
    return model, features_of(model, x, y), features_of(model, xt)


BASE = {"nnguide": {"alpha": 1.0}}  # the default alpha=0.01 leaves 12 rows, fewer than k=500


def _scores(name, model, fit, test, **hp):
    det = normscore.create(name, **{**BASE.get(name, {}), **hp}).attach(model)
    if det.needs_fit:
        det.fit_features(fit, calibration=0.0)
    return det, det.score_features(test)


def _distinct(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("name", [n for n in ZOO if normscore.detector_info(n)["search_space"] and n != "odin"])
def test_every_search_space_value_changes_the_scores(name, feat_problem):
    model, fit, test = feat_problem
    if name == "gen":  # M up to 1000 needs that many classes: logits only
        g = torch.Generator().manual_seed(0)
        test = Features(logits=2.0 * torch.randn(50, 1200, generator=g))
    space = normscore.detector_info(name)["search_space"]
    default, _ = _scores(name, model, fit, test)
    for hp, values in space.items():
        runs = [_scores(name, model, fit, test, **{hp: v})[1] for v in values]
        for i in range(len(values)):
            assert torch.isfinite(runs[i]).all(), (name, hp, values[i])
            for j in range(i):
                assert _distinct(runs[i], runs[j]), f"{name}: {hp}={values[i]} and {values[j]} give the same scores"
        # score-time hyperparameters: set_params on the fitted detector equals a fresh fit
        for v, s in zip(values, runs):
            default.set_params(**{hp: v})
            assert torch.equal(default.score_features(test), s), (name, hp, v)
        default.set_params(**{hp: normscore.detector_info(name)["hyperparameters"][hp]})


def test_odin_search_space_changes_the_scores():
    torch.manual_seed(0)
    model = TinyCNN(num_classes=5).eval()
    with torch.no_grad():  # logits of a trained model's scale (a random head gives |z| < 1)
        model.fc.weight.mul_(30.0)
    x = torch.randn(12, 3, 16, 16)
    space = normscore.detector_info("odin")["search_space"]
    for hp, values in space.items():
        runs = [normscore.create("odin", **{hp: v}).attach(model).score(x) for v in values]
        for i in range(len(values)):
            for j in range(i):
                assert _distinct(runs[i], runs[j]), (hp, values[i], values[j])


OTHER_SPACES = [n for n in normscore.list_detectors() if normscore.detector_info(n)["search_space"] and n not in ZOO]


@pytest.mark.parametrize("name", OTHER_SPACES)
def test_search_spaces_outside_the_zoo_change_the_scores(name):
    """energy, featurenorm, gradnorm, fusion, ...: every value of every search-space entry gives
    different scores (fitted with the model, since some are multi-pass or need input views)."""
    torch.manual_seed(0)
    model = TinyCNN(num_classes=5).eval()
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
    loader = make_loader(n=40, batch=20, size=16, classes=5)
    x = torch.randn(12, 3, 16, 16)
    for hp, values in normscore.detector_info(name)["search_space"].items():
        runs = [create_small(name, **{hp: v}).fit(model, loader).score(x) for v in values]
        for i in range(len(values)):
            assert torch.isfinite(runs[i]).all(), (name, hp, values[i])
            for j in range(i):
                assert _distinct(runs[i], runs[j]), f"{name}: {hp}={values[i]} and {values[j]} give the same scores"


# ---------------------------------------------------------------------------------------------
# one shared pass, batch-size invariance, persistence


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=10)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def cnn_loader():
    return make_loader(n=160, batch=32, classes=10, seed=3)


@pytest.fixture(scope="module")
def cnn_fitted(cnn, cnn_loader):
    return {n: create_small(n).fit(cnn, cnn_loader) for n in ZOO}


def test_detector_set_of_the_zoo_equals_each_detector_alone(cnn, cnn_loader, cnn_fitted):
    ds = normscore.DetectorSet([create_small(n) for n in ZOO]).fit(cnn, cnn_loader)
    x = torch.randn(7, 3, 16, 16)
    got = ds.score(x)
    assert list(got) == ZOO
    for n in ZOO:
        assert torch.equal(got[n], cnn_fitted[n].score(x)), n
        assert ds[n].decision == cnn_fitted[n].decision, n


def test_zoo_scores_do_not_depend_on_batch_size_or_order(cnn_fitted):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 3, 16, 16, generator=g)
    perm = torch.randperm(11, generator=g)
    for n, det in cnn_fitted.items():
        full = det.score(x)
        parts = torch.cat([det.score(x[i : i + 4]) for i in range(0, 11, 4)])
        single = torch.cat([det.score(x[i : i + 1]) for i in range(11)])
        assert full.shape == (11,) and full.dtype == torch.float32 and torch.isfinite(full).all(), n
        for other in (parts, single):
            assert torch.allclose(full, other, rtol=1e-5, atol=1e-5), n
        assert torch.allclose(full[perm], det.score(x[perm]), rtol=1e-5, atol=1e-5), n


def test_zoo_fits_do_not_depend_on_the_fit_batch_size(cnn, cnn_fitted):
    x = torch.randn(6, 3, 16, 16)
    loader = make_loader(n=160, batch=7, classes=10, seed=3)  # same samples, other batching
    for n in ZOO:
        other = create_small(n).fit(cnn, loader)
        assert torch.allclose(other.score(x), cnn_fitted[n].score(x), rtol=1e-5, atol=1e-5), n


def test_zoo_save_load_roundtrip_is_bitwise(tmp_path, cnn, cnn_fitted):
    x = torch.randn(6, 3, 16, 16)
    for n, det in cnn_fitted.items():
        det.save(tmp_path / f"{n}.ns")
        back = normscore.load(tmp_path / f"{n}.ns", model=cnn)
        assert type(back) is type(det) and back.get_params() == det.get_params(), n
        assert back.decision == det.decision, n
        assert torch.equal(back.score(x), det.score(x)), n
    ds = normscore.DetectorSet([create_small(n) for n in ("knn", "vim", "mahalanobis", "react", "dice")])
    ds.fit(cnn, make_loader(n=60, classes=10))
    ds.save(tmp_path / "set.ns")
    back = normscore.load(tmp_path / "set.ns", model=cnn)
    a, b = ds.score(x), back.score(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("name", sorted(CLASS_CONDITIONAL))
def test_class_conditional_detectors_say_labels_are_missing(name, cnn):
    unlabelled = [torch.randn(16, 3, 16, 16) for _ in range(3)]
    with pytest.raises(InputError, match="needs labels"):
        normscore.create(name).fit(cnn, unlabelled)
    with pytest.raises(InputError, match="needs labels"):
        normscore.DetectorSet(["msp", name]).fit(cnn, unlabelled)
    bad = [(torch.randn(16, 3, 16, 16), torch.full((16,), 12))]  # the model has 10 classes
    with pytest.raises(InputError, match=r"labels in \[0, 10\)"):
        normscore.create(name).fit(cnn, bad)


def test_unknown_and_out_of_range_hyperparameters_are_rejected():
    for name, bad in (
        ("gen", {"gamma": 0}),
        ("gen", {"M": 2.5}),
        ("odin", {"noise": -0.1}),
        ("react", {"percentile": 101}),
        ("ash", {"variant": "q"}),
        ("ash", {"percentile": 100}),
        ("dice", {"percentile": -1}),
        ("mahalanobis", {"shrinkage": 1.5}),
        ("knn", {"k": 0}),
        ("knn", {"index": "hnsw"}),
        ("nnguide", {"alpha": 0}),
        ("fdbd", {"distance_as_normalizer": "yes"}),
        ("knn", {"K": 5}),
    ):
        with pytest.raises(normscore.ConfigError):
            normscore.create(name, **bad)


def test_feature_detectors_need_a_model_head():
    """A model without a linear head still runs the logit detectors of the zoo."""

    class NoHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean((2, 3))

    model = NoHead().eval()
    loader = make_loader(n=20, classes=5)
    for n in ("entropy", "gen", "klm", "odin"):
        normscore.create(n).fit(model, loader).score(torch.randn(2, 3, 16, 16))
    with pytest.raises(normscore.AdapterError, match="no linear head"):
        normscore.create("vim").fit(model, loader)


def test_fit_on_gaussians_separates_far_ood():
    """End to end on a tiny model: the distance detectors rank inputs far from the ID Gaussians
    lower (energy-weighted NNGuide need not: a random head gives far inputs large logits)."""
    model = FeatNet(8, 3, relu=False).eval()
    xa, ya = gaussians(350, 8, 3, seed=20, sep=2.0)
    x, y, xi = xa[:300], ya[:300], xa[300:]
    xo = 12.0 * torch.randn(50, 8, 1, 1, generator=torch.Generator().manual_seed(21))
    for n in ("mahalanobis", "rmds", "knn"):
        det = create_small(n).fit(model, [(x, y)])
        auroc = normscore.metrics.auroc(det.score(xi), det.score(xo))
        assert auroc > 0.95, (n, auroc)
