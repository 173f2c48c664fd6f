"""The Detector API: fit/score/predict, registry, loaders, calibration, hygiene, persistence."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers import TinyCNN, assert_unchanged, make_loader, snapshot
from zoo_helpers import SMALL_DATA_HPARAMS, ZOO, sign_scenario

import normscore
from normscore.errors import ConfigError, InputError, InputTypeError, NotFittedError

FOUNDATION = ["msp", "maxlogit", "energy", "penultimate_norm"]


def test_registry_names_are_snake_case_and_have_metadata():
    names = normscore.list_detectors()
    for n in FOUNDATION:
        assert n in names
    for n in names:
        assert n == n.lower() and " " not in n and "-" not in n
        info = normscore.detector_info(n)
        assert info["paper"] and info["formula"]
        for p in info["search_space"]:
            assert p in info["hyperparameters"]


def test_unknown_detector_and_hyperparameters():
    with pytest.raises(ConfigError, match="Did you mean 'energy'"):
        normscore.create("enrgy")
    with pytest.raises(ConfigError, match="Did you mean 'temperature'"):
        normscore.create("energy", temprature=2.0)
    with pytest.raises(ConfigError, match="out of range"):
        normscore.create("energy", temperature=-1.0)
    with pytest.raises(ConfigError, match="must be a number"):
        normscore.create("energy", temperature="hot")
    det = normscore.create("energy", temperature=2.0)
    with pytest.raises(ConfigError, match="out of range"):
        det.set_params(temperature=0.0)
    assert det.temperature == 2.0  # rolled back


@pytest.mark.parametrize("name", FOUNDATION)
def test_fit_returns_self_and_scores_are_float_vectors(name, tiny_model, loader):
    det = normscore.create(name)
    assert det.fit(tiny_model, loader) is det
    s = det.score(torch.randn(5, 3, 16, 16))
    assert s.shape == (5,) and s.dtype == torch.float32
    p = det.predict(torch.randn(5, 3, 16, 16))
    assert p.dtype == torch.bool and p.shape == (5,)


def test_sign_convention_higher_is_more_in_distribution():
    """One place for the convention: confident logits / large features must score higher."""
    from normscore.taps import Features

    confident = torch.tensor([[10.0, 0.0, 0.0]])
    uncertain = torch.tensor([[0.1, 0.0, 0.05]])
    big, small = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.3, 0.4]])
    for name in normscore.list_detectors():
        det = normscore.create(name)
        spec_keys = {"msp", "maxlogit", "energy"}
        if name in spec_keys:
            hi = det.score_features(Features(logits=confident))
            lo = det.score_features(Features(logits=uncertain))
            assert hi.item() > lo.item(), name
        elif name == "penultimate_norm":
            assert det.score_features(Features(penultimate=big)) > det.score_features(Features(penultimate=small))
    # the zoo: fitted on a clear-cut problem (ID = confident class clusters, OOD = low-confidence
    # noise near the origin), ID must score higher (AUROC > 0.9) for every detector
    model, fit_loader, id_x, ood_x = sign_scenario()
    for name in ZOO:
        det = normscore.create(name, **SMALL_DATA_HPARAMS.get(name, {})).fit(model, fit_loader)
        auroc = normscore.metrics.auroc(det.score(id_x), det.score(ood_x))
        assert auroc > 0.9, (name, auroc)


@pytest.mark.parametrize("name", FOUNDATION)
def test_scores_do_not_depend_on_batch_size_or_order(name, resnet):
    det = normscore.create(name).fit(resnet, make_loader(size=32, n=32))
    x = torch.randn(12, 3, 32, 32)
    full = det.score(x)
    parts = torch.cat([det.score(x[i : i + 5]) for i in range(0, 12, 5)])
    single = torch.cat([det.score(x[i : i + 1]) for i in range(12)])
    perm = torch.randperm(12)
    assert torch.allclose(full, parts, rtol=1e-5, atol=1e-5)
    assert torch.allclose(full, single, rtol=1e-5, atol=1e-5)
    assert torch.allclose(full[perm], det.score(x[perm]), rtol=1e-5, atol=1e-5)


ARCHS = {
    "timm-resnet18": lambda: timm.create_model("resnet18", num_classes=5),
    "timm-vit": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32),
    "timm-convnext": lambda: timm.create_model("convnext_atto", num_classes=5),
    "tv-mobilenet_v3": lambda: torchvision.models.mobilenet_v3_small(num_classes=5),
    "tv-densenet": lambda: torchvision.models.densenet121(num_classes=5),
    "tiny-cnn": lambda: TinyCNN(num_classes=5),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_detector_leaves_the_model_unchanged(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]()
    model.train()  # detectors must restore train mode and not touch BN statistics
    for p in list(model.parameters())[:3]:
        p.requires_grad_(False)
    snap = snapshot(model)
    size = 16 if arch == "tiny-cnn" else 32
    loader = make_loader(n=20, batch=10, size=size, classes=5)
    x = torch.randn(4, 3, size, size)
    for name in normscore.list_detectors():
        det = normscore.create(name, **SMALL_DATA_HPARAMS.get(name, {})).fit(model, loader)
        det.score(x)
        det.predict(x)
        with pytest.raises(InputError):
            det.score(torch.full((2, 3, size, size), float("inf")))
        assert_unchanged(model, snap)


def test_loader_item_types(tiny_model):
    x = torch.randn(20, 3, 16, 16)
    y = torch.randint(0, 10, (20,))
    ref = normscore.create("energy").fit(tiny_model, [x]).decision.threshold
    for loader in (
        [x[:10], x[10:]],
        [(x[:10], y[:10]), (x[10:], y[10:])],
        [[x[:10]], [x[10:]]],
        [{"image": x[:10], "label": y[:10]}, {"image": x[10:], "label": y[10:]}],
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7),
        (b for b in [x[:10], x[10:]]),  # one-shot generators are fine for single-pass fits
    ):
        assert normscore.create("energy").fit(tiny_model, loader).decision.threshold == pytest.approx(ref, abs=1e-5)


def test_loader_errors(tiny_model):
    with pytest.raises(InputError, match="no samples"):
        normscore.create("energy").fit(tiny_model, [])
    with pytest.raises(InputTypeError, match="'image' key|image"):
        normscore.create("energy").fit(tiny_model, [{"pixels": torch.randn(2, 3, 16, 16)}])
    with pytest.raises(InputTypeError, match="str"):
        normscore.create("energy").fit(tiny_model, ["not an image"])
    with pytest.raises(InputTypeError, match="not one tensor"):
        normscore.create("energy").fit(tiny_model, torch.randn(4, 3, 16, 16))
    with pytest.raises(InputTypeError):
        normscore.create("energy").fit(tiny_model, 42)
    with pytest.raises(ConfigError, match="nn.Module"):
        normscore.create("energy").fit("resnet18", [torch.randn(2, 3, 16, 16)])


def test_score_before_fit_or_attach():
    with pytest.raises(NotFittedError, match="fit"):
        normscore.create("energy").score(torch.randn(2, 3, 16, 16))


def test_calibrated_threshold_keeps_the_target_tpr(tiny_model):
    loader = make_loader(n=200, batch=32)
    for tpr in (0.8, 0.95):
        det = normscore.create("energy").fit(tiny_model, loader, tpr=tpr)
        d = det.decision
        assert d.n == 200 and d.tpr == tpr and d.achieved_tpr >= tpr
        xs = torch.cat([b[0] for b in loader])
        accepted = (~det.predict(xs)).float().mean().item()
        assert accepted == pytest.approx(d.achieved_tpr, abs=1e-6)


def test_calibration_holdout_does_not_depend_on_batch_size(tiny_model):
    from normscore.stream import FitStream

    a = normscore.get_adapter(tiny_model)
    for batch in (1, 7, 64):
        s = FitStream(a, make_loader(n=50, batch=batch), calibration=0.1)
        held = torch.cat([b.index[s.calibration_mask(b.index)] for b in s.batches()])
        assert held.tolist() == [9, 19, 29, 39, 49]


def test_detector_set_equals_detectors_alone(resnet):
    loader = make_loader(size=32, n=40)
    x = torch.randn(6, 3, 32, 32)
    ds = normscore.DetectorSet(FOUNDATION).fit(resnet, loader)
    got = ds.score(x)
    for name in FOUNDATION:
        alone = normscore.create(name).fit(resnet, loader)
        assert torch.equal(got[name], alone.score(x)), name
        assert ds[name].decision == alone.decision


def test_save_load_roundtrip_is_bitwise(tmp_path, resnet):
    x = torch.randn(5, 3, 32, 32)
    det = normscore.create("energy", temperature=3.0).fit(resnet, make_loader(size=32))
    det.save(tmp_path / "e.ns")
    back = normscore.load(tmp_path / "e.ns", model=resnet)
    assert back.temperature == 3.0 and back.decision == det.decision
    assert torch.equal(back.score(x), det.score(x))
    ds = normscore.DetectorSet(FOUNDATION).fit(resnet, make_loader(size=32))
    ds.save(tmp_path / "set.ns")
    ds2 = normscore.load(tmp_path / "set.ns", model=resnet)
    a, b = ds.score(x), ds2.score(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_mode_is_declared_once_and_matches_the_class():
    """Each detector's fit mode: ``none`` without statistics, ``multi_pass`` for its own passes
    (LDG, fusion, NAC: its fit runs a forward + backward per batch itself), else
    ``single_pass``; bench and fit_detectors ask it, nothing introspects."""
    from normscore.detectors.base import FIT_MODES, Detector

    modes = {n: normscore.detector_class(n).fit_mode for n in normscore.list_detectors()}
    assert set(modes.values()) == set(FIT_MODES)
    assert {n for n, m in modes.items() if m == "multi_pass"} == {"ldg", "fusion", "nac"}
    for n, m in modes.items():
        assert (m == "none") == (not normscore.detector_class(n).needs_fit), n

    class OwnPasses(Detector):  # undeclared: worked out from what the class implements
        needs_fit = True

        def _fit(self, stream):
            return None

    assert OwnPasses.fit_mode == "multi_pass"
    with pytest.raises(TypeError, match="declares fit_mode = 'single_pass' but implements 'multi_pass'"):

        class Wrong(Detector):
            needs_fit = True
            fit_mode = "single_pass"

            def _fit(self, stream):
                return None

    with pytest.raises(TypeError, match="declares fit_mode = 'multi_pass' but implements 'none'"):

        class Wrong2(Detector):
            fit_mode = "multi_pass"

    with pytest.raises(TypeError, match="overrides _fit but declares needs_fit = False"):

        class Wrong3(Detector):
            def _fit(self, stream):
                return None


def test_a_single_pass_fit_that_needs_gradients_runs_its_own_pass_and_is_calibrated(tiny_model):
    """A ``single_pass`` detector whose fit features need a backward pass cannot share the
    forward pass: it runs its streamed fit alone (``Detector._fit``), keeps the held-out
    features of that pass and gets the threshold of its held-out scores."""
    from normscore.detectors.base import Detector
    from normscore.taps import BackwardSpec, CaptureSpec

    class GradMean(Detector):
        name = "grad_mean_test"
        needs_fit = True

        def capture_spec(self, adapter, stage):
            if stage == "fit":
                return CaptureSpec(logits=True, backward=BackwardSpec(lambda z: z.logsumexp(1), input_grad=True))
            return CaptureSpec(logits=True)

        def _fit_begin(self, adapter):
            self._total, self._n = 0.0, 0

        def _fit_update(self, feats):
            self._total += float(feats["input_grad"].abs().sum())
            self._n += feats.batch_size

        def _fit_end(self):
            self.scale_ = self._total / self._n

        def score_features(self, feats):
            return feats["logits"].float().amax(1) * self.scale_

    assert GradMean.fit_mode == "single_pass"
    loader = make_loader(n=100, batch=16)
    det = GradMean().fit(tiny_model, loader, calibration=0.2)
    xs = torch.cat([b[0] for b in loader])
    held = xs[4::5]  # sample i is held out iff i % 5 == 4
    d = det.decision
    assert d.n == 20 and det.n_fit_samples_ == 100
    ref = normscore.Decision.calibrate(det.score(held), 0.95, warn=False)
    assert d.threshold == pytest.approx(ref.threshold, rel=1e-5) and d.achieved_tpr == ref.achieved_tpr
