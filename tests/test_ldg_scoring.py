"""LDG with any feature-space detector: ``create("ldg", scoring=NAME)`` equals ``create(NAME)``
fitted (``fit_features``) on the low-dimensional gradients of the fit samples and scored on
``det.transform(x)``, both computed by hand; ViM / Residual (origin = the ID mean of G_low)
against a float64 reference; LDG's own scorings unchanged; persistence; clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TinyCNN, assert_unchanged, make_loader, snapshot
from zoo_helpers import FeatNet

import normscore
from normscore.detectors.ldg import DETECTOR_SCORINGS, NATIVE_SCORINGS, REFUSED_SCORINGS, fit_on_rows
from normscore.errors import ConfigError, InputError, ModelMismatchError
from normscore.taps import Features

K = 8  # n_components
C = 5  # classes
#: small-bank hyperparameters (the defaults of the neighbour detectors need >= 100 bank rows)
SMALL = {"nnguide": {"k": 3, "alpha": 1.0}, "cfood": {"k": 0.1}}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = TinyCNN(num_classes=C).train()
    with torch.no_grad():
        m(torch.randn(16, 3, 16, 16))  # non-trivial BatchNorm statistics
    return m.eval()


@pytest.fixture(scope="module")
def setup():
    m = _model()
    loader = make_loader(n=80, batch=20, classes=C)
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    fit_rows = (torch.arange(80) % 10) != 9  # fit(calibration=0.1) holds out every 10th sample
    xt = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    return m, loader, x[fit_rows], y[fit_rows], xt


def _ldg(scoring: str = "knn", **kw) -> normscore.Detector:
    return normscore.create("ldg", params="head", n_components=K, k=3, scoring=scoring, **kw)


def _attach_k(det: normscore.Detector) -> normscore.Detector:
    """Attach ``det`` to a model whose penultimate features are K-dimensional (the shape of G_low)
    and whose logits have C classes, so its feature-shape checks see the features it is fitted on."""
    net = FeatNet(dim=K, classes=C, relu=False)
    adapter = normscore.get_adapter(net)
    adapter.ensure_resolved(torch.zeros(1, K, 1, 1))
    return det.attach(net, adapter)


def _by_hand(det, name: str, params: dict, x_fit, y_fit, m) -> normscore.Detector:
    """``create(name)`` fitted with ``fit_features`` on G_low of the fit samples, computed with
    ``det.transform``, and the model's logits of the fit samples."""
    with torch.no_grad():
        z_fit = m(x_fit)
    g_fit = det.transform(x_fit)
    ref = _attach_k(normscore.create(name, **params))
    return ref.fit_features(Features(penultimate=g_fit, logits=z_fit, labels=y_fit), calibration=0.0)


@pytest.mark.parametrize(
    "name", ["mahalanobis", "rmds", "mahalanobis_pp", "rmds_pp", "she", "nnguide", "gmm", "neco", "relation", "grood"]
)
def test_scoring_equals_the_detector_fitted_on_glow_by_hand(setup, name):
    m, loader, x_fit, y_fit, xt = setup
    params = SMALL.get(name, {})
    det = _ldg(name, scoring_params=params or None).fit(m, loader)
    # the bank is G_low of the fit samples (the rows the scoring detector is fitted on)
    assert torch.allclose(det.transform(x_fit), det.bank_, atol=1e-5, rtol=1e-5)
    ref = _by_hand(det, name, params, x_fit, y_fit, m)
    with torch.no_grad():
        zt = m(xt)
    want = ref.score_features(Features(penultimate=det.transform(xt), logits=zt))
    got = det.score(xt)
    assert got.shape == (7,) and torch.isfinite(got).all()
    assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6), (got, want)  # bitwise here
    assert det.scoring_detector_.name == name and det.scoring_detector_.n_fit_samples_ == 72
    assert det.fit_needs_labels() == normscore.create(name, **params).fit_needs_labels()


def test_cfood_scoring_equals_the_detector_fitted_on_glow_by_hand(setup):
    # cfood's score is a step function of neighbourhood ranks: compared where the two inputs agree
    m, loader, _, _, xt = setup
    det = _ldg("cfood", scoring_params=SMALL["cfood"]).fit(m, loader)
    ref = _attach_k(normscore.create("cfood", **SMALL["cfood"]))
    ref.fit_features(Features(penultimate=det.bank_.clone()), calibration=0.0)
    assert torch.equal(ref.score_features(Features(penultimate=det.transform(xt))), det.score(xt))


def test_fit_on_rows_equals_fit_features_bitwise(setup):
    """LDG fits its scoring detector with ``fit_on_rows`` (no cross-rank reduction: the bank
    already holds every rank's rows); in one process it equals ``fit_features`` exactly."""
    m, _, _, _, _ = setup
    g = torch.Generator().manual_seed(1)
    feats = Features(penultimate=torch.randn(40, K, generator=g), logits=torch.randn(40, C, generator=g))
    feats["labels"] = torch.randint(0, C, (40,), generator=g)
    adapter = normscore.get_adapter(m)
    for name in ("mahalanobis", "rmds", "gmm", "neco", "nnguide", "she", "grood", "relation"):
        a = normscore.create(name, **SMALL.get(name, {}))
        fit_on_rows(a, feats, adapter)
        b = _attach_k(normscore.create(name, **SMALL.get(name, {})))
        b.fit_features(feats, calibration=0.0)
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa["tensors"]) == set(sb["tensors"]), name
        for key, t in sa["tensors"].items():
            assert torch.equal(t, sb["tensors"][key]), (name, key)


def _vim_reference(bank: torch.Tensor, z_fit: torch.Tensor, g: torch.Tensor, z: torch.Tensor, dim: int):
    """ViM in float64 numpy with origin 0 (the ID mean of G_low): eigenvectors of the second
    moment of the bank, residual beyond the ``dim`` leading ones, alpha = mean max logit / mean
    residual; returns (vim score, residual score)."""
    b = bank.double().numpy()
    vals, vecs = np.linalg.eigh(b.T @ b / b.shape[0])
    null = vecs[:, np.argsort(-vals)][:, dim:]
    r_fit = np.linalg.norm(b @ null, axis=1)
    alpha = z_fit.double().numpy().max(1).mean() / r_fit.mean()
    r = np.linalg.norm(g.double().numpy() @ null, axis=1)
    zz = z.double().numpy()
    energy = zz.max(1) + np.log(np.exp(zz - zz.max(1, keepdims=True)).sum(1))
    return energy - alpha * r, -r


def test_vim_and_residual_take_the_id_mean_as_origin(setup):
    m, loader, x_fit, _, xt = setup
    with torch.no_grad():
        z_fit, zt = m(x_fit), m(xt)
    for dim in (None, 3):
        vim = _ldg("vim", scoring_params=None if dim is None else {"dim": dim}).fit(m, loader)
        res = _ldg("residual", scoring_params=None if dim is None else {"dim": dim}).fit(m, loader)
        d = K // 2 if dim is None else dim  # ViM's rule for D < 768: D / 2
        assert torch.equal(vim.scoring_detector_.origin_, torch.zeros(K, dtype=torch.float64))
        # the bank is centred: G_low(x) = (g(x) - mu)/sigma V and mu is the fit samples' mean
        assert vim.bank_.double().mean(0).abs().max() < 1e-5 * vim.bank_.abs().max()
        want_vim, want_res = _vim_reference(vim.bank_, z_fit, vim.transform(xt), zt, d)
        assert np.allclose(vim.score(xt).double().numpy(), want_vim, rtol=1e-4, atol=1e-4)
        assert np.allclose(res.score(xt).double().numpy(), want_res, rtol=1e-4, atol=1e-4)


def test_native_scorings_are_unchanged(setup):
    """knn / probe / ensemble do not depend on the scoring detector: an LDG fitted with
    scoring='mahalanobis' and switched back gives the knn LDG's scores exactly; LDG's knn is the
    knn detector (k = LDG's k) on G_low."""
    m, loader, _, _, xt = setup
    plain = _ldg().fit(m, loader)
    maha = _ldg("mahalanobis").fit(m, loader)
    assert torch.equal(plain.bank_, maha.bank_)
    for scoring in NATIVE_SCORINGS:
        a = plain.set_params(scoring=scoring).score(xt)
        b = maha.set_params(scoring=scoring).score(xt)
        assert torch.equal(a, b), scoring
    plain.set_params(scoring="knn")
    knn = _attach_k(normscore.create("knn", k=3))
    knn.fit_features(Features(penultimate=plain.bank_.clone()), calibration=0.0)
    ref = knn.score_features(Features(penultimate=plain.transform(xt)))
    assert torch.allclose(plain.score(xt), ref, atol=1e-5)
    # back to the scoring it was fitted with: no refit needed
    assert torch.equal(maha.set_params(scoring="mahalanobis").score(xt), _ldg("mahalanobis").fit(m, loader).score(xt))


def test_scoring_params_get_set_and_switching(setup):
    m, loader, _, _, xt = setup
    det = _ldg("mahalanobis", scoring_params={"shrinkage": 0.1}).fit(m, loader)
    assert det.get_params()["scoring_params"] == {"shrinkage": 0.1}
    assert det.scoring_detector_.shrinkage == 0.1
    assert "scoring_params={'shrinkage': 0.1}" in repr(det)
    # a score-time hyperparameter of the scoring detector changes without a refit
    fresh = _ldg("mahalanobis").fit(m, loader)
    assert torch.equal(det.set_params(scoring_params=None).score(xt), fresh.score(xt))
    assert det.scoring_detector_.shrinkage == 0.0
    # a detector scoring other than the fitted one needs a refit
    with pytest.raises(ConfigError, match="Refit"):
        det.set_params(scoring="rmds").score(xt)
    with pytest.raises(ConfigError, match="Refit"):
        _ldg().fit(m, loader).set_params(scoring="vim").score(xt)


def test_save_load_bitwise(setup, tmp_path):
    m, loader, _, _, xt = setup
    for name in ("mahalanobis", "vim", "nnguide", "gmm"):
        det = _ldg(name, scoring_params=SMALL.get(name)).fit(m, loader)
        det.save(tmp_path / "l.ns")
        back = normscore.load(tmp_path / "l.ns", model=m)
        assert back.get_params() == det.get_params()
        assert back.scoring_detector_.name == name
        assert torch.equal(back.score(xt), det.score(xt)), name
        assert back.decision.threshold == det.decision.threshold
        assert torch.equal(back.predict(xt), det.predict(xt))
    # a loaded detector scores under set_params like the original
    assert torch.equal(back.set_params(scoring="knn").score(xt), det.set_params(scoring="knn").score(xt))


def test_fit_leaves_the_model_alone_and_scores_do_not_depend_on_the_batch(setup):
    m, loader, _, _, xt = setup
    snap = snapshot(m)
    det = _ldg("rmds").fit(m, loader)
    s = det.score(xt)
    assert_unchanged(m, snap)
    parts = torch.cat([det.score(xt[:3]), det.score(xt[3:])])
    assert torch.allclose(s, parts, rtol=1e-5, atol=1e-5)
    assert ((det.predict(xt)) == (s < det.decision.threshold)).all()


def test_fingerprint_and_detector_set(setup):
    m, loader, _, _, xt = setup
    det = _ldg("mahalanobis").fit(m, loader)
    with pytest.raises(ModelMismatchError):
        det.attach(_model(seed=1))
    ds = normscore.DetectorSet([_ldg("mahalanobis"), "msp"]).fit(m, loader)
    assert torch.allclose(ds.score(xt)["ldg"], det.score(xt), atol=1e-5)


def test_errors_are_clear(setup):
    m, loader, _, _, _ = setup
    for name, reason in (
        ("fdbd", "linear head"),
        ("react", "post-ReLU"),
        ("msp", "only the logits"),
        ("penultimate_norm", "backwards"),
        ("featurenorm", "block features"),
        ("odin", "needs the model"),
        ("fusion", "fuse LDG variants"),
    ):
        with pytest.raises(ConfigError, match=reason) as info:
            normscore.create("ldg", scoring=name)
        assert "mahalanobis" in str(info.value) and "probe_msp" in str(info.value)
    with pytest.raises(ConfigError, match="Did you mean"):
        normscore.create("ldg", scoring="mahalanobiss")
    with pytest.raises(ConfigError, match="LDG's own"):
        normscore.create("ldg", scoring="knn", scoring_params={"k": 3})
    with pytest.raises(ConfigError, match="shrinkge"):
        normscore.create("ldg", scoring="mahalanobis", scoring_params={"shrinkge": 0.1})
    with pytest.raises(ConfigError, match="out of range"):
        normscore.create("ldg", scoring="mahalanobis", scoring_params={"shrinkage": 2.0})
    with pytest.raises(ConfigError, match="dict"):
        normscore.create("ldg", scoring="mahalanobis", scoring_params=[("shrinkage", 0.1)])
    det = _ldg("mahalanobis")
    with pytest.raises(ConfigError):
        det.set_params(scoring="ash")
    assert det.scoring == "mahalanobis"  # a refused value leaves the hyperparameters as they were
    with pytest.raises(InputError, match="labels"):
        _ldg("mahalanobis").fit(m, [xb for xb, _ in loader])
    # every registered detector is either a scoring or refused with a reason
    names = set(normscore.list_detectors())
    covered = set(NATIVE_SCORINGS) | set(DETECTOR_SCORINGS) | set(REFUSED_SCORINGS)
    assert names <= covered, f"classify {names - covered} in DETECTOR_SCORINGS or REFUSED_SCORINGS"
    assert not set(DETECTOR_SCORINGS) & set(REFUSED_SCORINGS)


_DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from dist_fit import Indexed, model
import normscore
torch.set_num_threads(1)
out, single = sys.argv[1], len(sys.argv) > 3
ds = Indexed(96)
if single:
    loader = torch.utils.data.DataLoader(ds, batch_size=32)
else:
    dist.init_process_group("gloo")
    sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler)
for name, sp in (("mahalanobis", None), ("vim", None), ("nnguide", {"k": 3, "alpha": 0.5})):
    det = normscore.create("ldg", params="head", n_components=6, scoring=name, scoring_params=sp).fit(model(), loader)
    if single or dist.get_rank() == 0:
        det.save(f"{out}/{'single' if single else 'dist'}-{name}.ns")
if not single:
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="gloo over localhost")
def test_sharded_fit_equals_single_process(tmp_path):
    """Under torch.distributed the scoring detector is fitted on the gathered bank (every rank's
    rows in global order) without cross-rank reductions: its state equals a single-process fit up
    to LDG's float32 tolerance (tests/test_distributed.py: 1e-4 relative)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "fit.py"
    script.write_text(_DIST_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(script), str(tmp_path), str(root / "benchmarks")]
    r = subprocess.run([sys.executable, *args, "single"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port)]
    r = subprocess.run([*run, *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from dist_fit import Indexed, model
    finally:
        sys.path.pop(0)
    m = model()
    xt = torch.stack([Indexed(96)[i]["image"] for i in range(8)]) + 0.3 * torch.randn(8, 1, 28, 28)
    for name in ("mahalanobis", "vim", "nnguide"):
        a = normscore.load(tmp_path / f"single-{name}.ns", model=m)
        b = normscore.load(tmp_path / f"dist-{name}.ns", model=m)
        assert a.bank_.shape == b.bank_.shape
        assert (a.bank_ - b.bank_).abs().max() <= 1e-4 * a.bank_.abs().max()
        sa, sb = a.scoring_detector_.state_dict(), b.scoring_detector_.state_dict()
        assert sa["fitted"]["n_fit_samples_"] == sb["fitted"]["n_fit_samples_"] == a.bank_.shape[0]
        assert set(sa["tensors"]) == set(sb["tensors"])
        for key, t in sa["tensors"].items():  # positions, labels, subsample masks: exactly
            if not t.dtype.is_floating_point:
                assert torch.equal(t, sb["tensors"][key]), (name, key)
        s_a, s_b = a.score(xt), b.score(xt)
        assert (s_a - s_b).abs().max() <= 1e-4 * s_a.abs().max(), (name, s_a, s_b)


def test_fusion_of_ldg_variants_saves_and_loads(setup, tmp_path):
    m, loader, _, _, xt = setup
    members = [{"name": "ldg", "params": "head", "n_components": K, "scoring": "mahalanobis"}, "msp"]
    f = normscore.create("fusion", members=members).fit(m, loader)
    f.save(tmp_path / "f.ns")
    back = normscore.load(tmp_path / "f.ns", model=m)
    assert torch.equal(back.score(xt), f.score(xt))
