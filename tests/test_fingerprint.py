"""A fitted detector is bound to the model it was fitted on: a model fingerprint is stored at fit
time, saved with the detector, and checked by attach / load(path, model=...) / ScoringModule;
features of the wrong width are refused with a clear error for every registered detector."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import timm
import torch
from helpers import TinyCNN, make_loader
from zoo_helpers import SMALL_DATA_HPARAMS

import normscore
from normscore import io as nio
from normscore.errors import ConfigError, InputError, ModelMismatchError
from normscore.pipeline import ScoringModule
from normscore.taps import Features, capture

SMALL = {**SMALL_DATA_HPARAMS, "ldg": {"n_components": 4}}
X = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _create(name: str) -> normscore.Detector:
    return normscore.create(name, **SMALL.get(name, {}))


def _tiny(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = TinyCNN(**kw)
    m.train()
    with torch.no_grad():
        m(torch.randn(16, 3, 16, 16))  # non-trivial BatchNorm statistics
    return m.eval()


def _resnet(seed: int, arch: str = "resnet18") -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=5).eval()


def _loader32():
    return make_loader(n=40, batch=20, size=32, classes=5)


@pytest.fixture(scope="module")
def r18():
    return _resnet(0)


@pytest.fixture(scope="module")
def maha_r18(r18):
    return normscore.create("mahalanobis").fit(r18, _loader32(), tag="v3")


# ---------------------------------------------------------------------------------------------
# the fingerprint itself


def test_fit_stores_a_fingerprint_of_model_and_features(r18, maha_r18):
    fp = maha_r18.fingerprint
    assert fp is not None
    assert fp.architecture == "timm.models.resnet.ResNet" and fp.variant == "resnet18"
    assert (fp.num_classes, fp.num_features, fp.head, fp.tag) == (5, 512, "fc", "v3")
    assert dict(fp.features) == {"penultimate": (512,)}
    assert fp.input_shape == (3, 32, 32)
    assert re.fullmatch(r"[0-9a-f]{64}", fp.head_sha256)
    # the same weights in another copy, in float64: the same fingerprint; another checkpoint: not
    twin = copy.deepcopy(r18)
    assert normscore.ModelFingerprint.of(_resolved(twin), ["penultimate"], tag="v3") == fp
    assert normscore.ModelFingerprint.of(_resolved(copy.deepcopy(r18).double()), ["penultimate"], tag="v3") == fp
    other = normscore.ModelFingerprint.of(_resolved(_resnet(1)), ["penultimate"], tag="v3")
    assert other.differences(fp) == ["head_sha256"]
    # an in-place update of the head (a fine-tuning step) changes it
    with torch.no_grad():
        twin.fc.weight[0, 0] += 1e-3
    assert normscore.ModelFingerprint.of(_resolved(twin), ["penultimate"], tag="v3").differences(fp) == ["head_sha256"]


def _resolved(model):
    a = normscore.Adapter(model)
    p = next(model.parameters())
    a.ensure_resolved(torch.zeros(1, 3, 32, 32, dtype=p.dtype))
    return a


def test_fit_free_detectors_have_no_fingerprint_until_fitted(r18):
    det = normscore.create("energy").attach(r18)
    assert det.fingerprint is None
    det.attach(_resnet(1))  # nothing fitted: nothing to check
    det.fit(r18, _loader32())
    assert det.fingerprint is not None and det.fingerprint.features == {"logits": (5,)}


# ---------------------------------------------------------------------------------------------
# attach / load / ScoringModule with another model


def test_other_checkpoint_of_the_same_architecture_is_refused(maha_r18, tmp_path):
    other = _resnet(1)
    maha_r18.save(tmp_path / "m.ns")
    for bind in (
        lambda: normscore.load(tmp_path / "m.ns", model=other),
        lambda: normscore.load(tmp_path / "m.ns").attach(other),
        lambda: ScoringModule(other, normscore.load(tmp_path / "m.ns")),
    ):
        with pytest.raises(ModelMismatchError) as info:
            bind()
        msg = str(info.value)
        assert isinstance(info.value, ConfigError)
        assert "differ in head_sha256." in msg, msg
        given = normscore.ModelFingerprint.of(normscore.get_adapter(other), ["penultimate"])
        assert maha_r18.fingerprint.head_sha256[:16] in msg and given.head_sha256[:16] in msg, msg
        assert "variant 'resnet18'" in msg and "strict=False" in msg and "det.fit(model, id_loader)" in msg


def test_other_architecture_is_refused(r18, tmp_path):
    knn = normscore.create("knn", k=5).fit(r18, _loader32())
    knn.save(tmp_path / "k.ns")
    with pytest.raises(ModelMismatchError) as info:
        normscore.load(tmp_path / "k.ns", model=_resnet(0, "resnet50"))
    msg = str(info.value)
    assert "differ in variant, num_features, features, head_sha256" in msg, msg
    assert re.search(r"variant\s+'resnet18'\s+'resnet50'", msg), msg
    assert re.search(r"features\s+penultimate \[512\]\s+penultimate \[2048\]", msg), msg
    # a model that cannot even run on the fit input shape is refused too
    with pytest.raises(ModelMismatchError, match="cannot be compared"):
        knn.attach(TinyCNN(in_chans=1))


def test_strict_false_reuses_deliberately_and_scores(maha_r18):
    other = _resnet(1)
    fp = maha_r18.fingerprint
    det = normscore.create("mahalanobis")
    det.load_state_dict(maha_r18.state_dict())
    with pytest.warns(UserWarning, match="strict=False: mahalanobis was fitted on another model"):
        det.attach(other, strict=False)
    s = det.score(torch.randn(4, 3, 32, 32))
    assert s.shape == (4,) and bool(torch.isfinite(s).all())
    assert det.fingerprint == fp  # the state still describes the model it was fitted on
    # refitting binds it to the new model without any opt-out
    det.fit(other, _loader32())
    assert det.fingerprint.differences(fp) == ["head_sha256", "tag"]
    det.attach(other)


def test_strict_false_on_another_architecture_gives_a_clear_shape_error(r18):
    knn = normscore.create("knn", k=5).fit(r18, _loader32())
    with pytest.warns(UserWarning, match="strict=False"):
        knn.attach(_resnet(0, "resnet50"), strict=False)
    with pytest.raises(InputError, match=r"'penultimate' features have shape \[2048\] per sample, but the detector "):
        knn.score(torch.randn(2, 3, 32, 32))


def test_tag_is_checked_when_asked(maha_r18, r18, tmp_path):
    maha_r18.save(tmp_path / "m.ns")
    assert normscore.load(tmp_path / "m.ns", model=r18, tag="v3").fingerprint.tag == "v3"
    normscore.load(tmp_path / "m.ns", model=r18)  # no tag asked: not compared
    with pytest.raises(ModelMismatchError, match=r"differ in tag\.[\s\S]*'v3'\s+'v4'"):
        normscore.load(tmp_path / "m.ns", model=r18, tag="v4")


def test_load_state_dict_on_an_attached_detector_checks_the_model(maha_r18):
    det = normscore.create("mahalanobis").attach(_resnet(1))
    with pytest.raises(ModelMismatchError):
        det.load_state_dict(maha_r18.state_dict())
    assert not det.is_fitted  # nothing was loaded
    with pytest.warns(UserWarning, match="strict=False"):
        det.load_state_dict(maha_r18.state_dict(), strict=False)
    assert det.fingerprint == maha_r18.fingerprint


# ---------------------------------------------------------------------------------------------
# persistence


def test_fingerprint_survives_save_and_load(tmp_path):
    m = _tiny()
    det = _create("knn").fit(m, make_loader(), tag="prod-7")
    ds = normscore.DetectorSet(["energy", _create("knn"), "fusion"]).fit(m, make_loader())
    det.save(tmp_path / "d.ns")
    ds.save(tmp_path / "s.ns")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right model attaches silently
        back = normscore.load(tmp_path / "d.ns", model=copy.deepcopy(m))
        back_set = normscore.load(tmp_path / "s.ns", model=m)
    assert back.fingerprint == det.fingerprint and back.fingerprint.tag == "prod-7"
    assert back.fingerprint.input_shape == (3, 16, 16)
    for k in ds:
        assert back_set[k].fingerprint == ds[k].fingerprint is not None, k
    assert torch.equal(back.score(X), det.score(X))
    other = _tiny(seed=1)
    with pytest.raises(ModelMismatchError, match="energy was fitted on another model"):
        normscore.load(tmp_path / "s.ns", model=other)
    failed = normscore.load(tmp_path / "s.ns")
    with pytest.raises(ModelMismatchError):
        failed.attach(other)
    assert failed._model is None and all(failed[k]._model is None for k in failed)  # nothing bound
    with pytest.warns(UserWarning):
        s = normscore.load(tmp_path / "s.ns", model=other, strict=False).score(X)
    assert set(s) == set(ds)


def test_a_file_without_fingerprint_still_loads(tmp_path):
    """Files of normscore 0.1.0 hold the same state without ``fingerprint_``."""
    m = _tiny()
    det = _create("knn").fit(m, make_loader())
    state = det.state_dict()
    del state["fitted"]["fingerprint_"]
    (tmp_path / "old.ns").write_bytes(nio.dumps("detector", state))
    old = normscore.load(tmp_path / "old.ns")
    assert old.is_fitted and old.fingerprint is None
    with pytest.warns(UserWarning, match="no model fingerprint"):
        old.attach(m)
    assert torch.equal(old.score(X), det.score(X))
    sd = normscore.DetectorSet([det]).state_dict()
    del sd["detectors"][0]["fitted"]["fingerprint_"]
    (tmp_path / "old_set.ns").write_bytes(nio.dumps("DetectorSet", sd))
    with pytest.warns(UserWarning, match="no model fingerprint"):
        assert torch.equal(normscore.load(tmp_path / "old_set.ns", model=m).score(X)["knn"], det.score(X))


# ---------------------------------------------------------------------------------------------
# feature shapes: every registered detector


SHAPE_ERRORS = {"dice", "fdbd", "klm", "knn", "mahalanobis", "nnguide", "react", "rmds", "she", "vim"}
# issue 14: fitted state of the penultimate / logit / block widths (features of another width are refused)
SHAPE_ERRORS |= {"openmax", "pnml", "relation", "weiper", "grood", "gmm", "mahalanobis_odin", "mahalanobis_pp"}
SHAPE_ERRORS |= {"multi_mahalanobis", "residual", "rmds_pp", "adascale", "cfood", "neco", "nci", "vra", "gram", "nac"}


@pytest.fixture(scope="module")
def two_architectures():
    # same module names, other widths: penultimate 16 -> 8, classes 10 -> 7
    return _tiny(), _tiny(seed=1, width=4, num_classes=7)


@pytest.mark.parametrize("name", normscore.list_detectors())
def test_reuse_on_another_architecture_never_fails_inside_torch_or_faiss(name, two_architectures):
    a, b = two_architectures
    det = _create(name).fit(a, make_loader(n=60, batch=20))
    with pytest.warns(UserWarning, match="strict=False"):
        det.attach(b, strict=False)
    if name in SHAPE_ERRORS:
        with pytest.raises(InputError) as info:
            det.score(X)
        msg = str(info.value)
        # penultimate 16 -> 8, classes 10 -> 7; block features.2 (multi_mahalanobis): 8 -> 4 channels
        assert re.search(
            r"features have shape \[(8|7|4)\] per sample, but the detector was fitted on \[(16|10|8)\]", msg
        )
        assert "refit it on this model" in msg
    elif name == "ldg":  # its gradient subspace lives in the parameter space of the fitted model
        with pytest.raises(ConfigError, match="layers do not match the fitted LDG state"):
            det.score(X)
    else:  # the score and its state do not depend on the feature widths
        s = det.score(X)
        assert s.shape == (6,) and bool(torch.isfinite(s).all())


@pytest.mark.parametrize("name", normscore.list_detectors())
def test_score_features_of_the_wrong_width_are_refused(name, two_architectures):
    a, _ = two_architectures
    det = _create(name).fit(a, make_loader(n=60, batch=20))
    spec = det.capture_spec(det.adapter, "score")
    feats = capture(det.adapter, X, spec)
    bound = [k for k in ("logits", "penultimate") if k in feats and k in det.shape_bound]
    if not bound:
        s = det.score_features(feats)
        assert s.shape == (6,)
        return
    for key in bound:
        wide = Features(feats)
        wide[key] = torch.cat([feats[key], feats[key][:, :3]], dim=1)
        d = feats[key].shape[1]
        with pytest.raises(InputError, match=rf"'{key}' features have shape \[{d + 3}\] per sample, but .* \[{d}\]"):
            det.score_features(wide)


def test_fit_free_detectors_check_against_the_attached_model(two_architectures):
    a, b = two_architectures
    feats_b = capture(normscore.get_adapter(b), X, normscore.CaptureSpec(logits=True, penultimate=True))
    for name in ("ash", "scale", "separation"):
        det = normscore.create(name).attach(a)
        det.score(X)  # resolves the adapter
        with pytest.raises(InputError, match=r"per sample, but the attached model produces \[(16|10)\]"):
            det.score_features(feats_b)
    # detectors whose score works at any width accept them
    for name in ("msp", "energy", "gradnorm", "penultimate_norm"):
        assert normscore.create(name).attach(a).score_features(feats_b).shape == (6,)
