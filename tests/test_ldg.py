"""LDG and the per-sample gradient engine against brute force (torch.func per-sample gradients)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import nn
from torch.func import functional_call, grad, vmap

import normscore
from normscore.detectors.engines.layers import resolve_layers
from normscore.detectors.engines.persample import ExactGradients, KroneckerSketch, _weight_dims, plan_sketch
from normscore.detectors.engines.subspace import DenseOperator, orthonormalize, randomized_subspace
from normscore.errors import CalibrationWarning, ConfigError, InputError, InputTypeError, NotFittedError


@pytest.fixture(autouse=True)
def _one_thread():
    """Small GEMMs and eigh on a shared 2-core machine: one thread avoids oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Scale(nn.Module):
    """A custom leaf layer: covered by the generic (vmap) fallback."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class _Net(nn.Module):
    """BN (+ in-place ReLU), depthwise conv, grouped reflect-padded strided conv, GroupNorm,
    generic leaves, a 1x1 conv (unfold route), a token Linear + LayerNorm and a linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.gn = nn.GroupNorm(3, 12)
        self.scale = _Scale(12)
        self.prelu = nn.PReLU()
        self.pw = nn.Conv2d(12, 12, 1)
        self.tok = nn.Linear(12, 12)
        self.ln = nn.LayerNorm(12)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.dw(x)))
        x = self.pw(self.prelu(self.scale(self.gn(self.gconv(x)))))
        t = self.tok(x.flatten(2).transpose(1, 2))  # [B, tokens, 12]
        return self.fc(self.ln(t).mean(1))


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    m = _Net().train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, 10, 10) * 1.5 + 0.3)
    return m.eval()


def _brute_grads(model, x, slots):
    """Full per-sample gradients of logsumexp(logits) via torch.func, in the engine's order."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    bufs = dict(model.named_buffers())

    def f(p, xi):
        return torch.logsumexp(functional_call(model, (p, bufs), (xi[None],)), 1)[0]

    g = vmap(grad(f), in_dims=(None, 0))(params, x)
    order = [f"{s.name}.{p}" for s in slots for p in s.params]
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in order], 1), order


def _data(n=60, seed=1, batch=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 10, 10, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y, [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_engine_per_sample_gradients_equal_torch_func():
    m = _net()
    x = torch.randn(6, 3, 10, 10)
    adapter = normscore.get_adapter(m)
    adapter.ensure_resolved(x)
    res = resolve_layers(adapter, "all", x)
    assert not res.excluded
    kinds = {s.name: s.kind for s in res.slots}
    assert kinds["dw"] == "conv" and kinds["bn1"] == "batchnorm" and kinds["gn"] == "groupnorm"
    assert kinds["scale"] == "generic" and kinds["prelu"] == "generic" and kinds["ln"] == "layernorm"
    ref, order = _brute_grads(m, x, res.slots)
    assert set(order) == {n for n, _ in m.named_parameters()}  # every parameter is covered
    eng = ExactGradients(res.slots, chunk_elems=2000)  # forces chunking over samples
    got = eng.materialize(adapter, x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_sketch_equals_kronecker_projection_of_the_exact_gradient():
    m = _net()
    x = torch.randn(5, 3, 10, 10)
    adapter = normscore.get_adapter(m)
    adapter.ensure_resolved(x)
    res = resolve_layers(adapter, "all", x)
    ref_g, _ = _brute_grads(m, x, res.slots)
    sk = KroneckerSketch(res.slots, plan_sketch(res.slots, 80), seed=3)
    got = sk.materialize(adapter, x)
    parts = []
    for i, s in enumerate(res.slots):
        gi = ref_g[:, s.offset : s.offset + s.size]
        ro, ri, rv = sk._matrices(i, torch.device("cpu"))
        o, n_in = _weight_dims(s)
        if o:
            w = gi[:, : o * n_in].reshape(-1, o, n_in)
            parts.append((w if ro is None else ro.T @ w @ ri).reshape(len(x), -1))
        vec = gi[:, o * n_in :]
        if vec.shape[1]:
            parts.append(vec if rv is None else vec @ rv)
    ref = torch.cat(parts, 1)
    assert got.shape == ref.shape and sk.dim < sum(s.size for s in res.slots)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("solver", ["dense", "randomized"])
def test_ldg_projections_equal_brute_force(solver):
    m = _net()
    snap = snapshot(m)
    x, _, loader = _data()
    det = normscore.create("ldg", n_components=8, solver=solver, n_iter=4).fit(m, loader)
    assert det.solver_ == solver and det.n_components_ == 8
    xt = torch.randn(7, 3, 10, 10)
    got = det.transform(xt)
    slots = det._layer_map().slots
    g, _ = _brute_grads(m, xt, slots)
    # the unfolded subspace V (components_ holds V / sigma)
    s = det.inv_std_
    v = torch.where(s[:, None] > 0, det.components_ / s.clamp_min(1e-30)[:, None], torch.zeros(()))
    assert torch.allclose(v.T @ v, torch.eye(8), atol=1e-4)
    ref = ((g - det.grad_mean_) * s) @ v
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # NFK statistics are those of the fit split (every 10th sample held out for calibration)
    fit_x = x[torch.arange(60) % 10 != 9]
    gfit, _ = _brute_grads(m, fit_x, slots)
    assert torch.allclose(det.grad_mean_, gfit.mean(0), atol=1e-6)
    sd = gfit.double().var(0, unbiased=False).sqrt()
    live = s > 0
    assert torch.allclose(1.0 / s[live].double(), sd[live], rtol=1e-3)
    # V spans the top principal directions of the normalised fit gradients
    vn = ((gfit - det.grad_mean_) * s).double()
    top = torch.linalg.svd(vn, full_matrices=False).Vh[:8].T
    cos = torch.linalg.svdvals(top.T @ v.double())
    assert cos.min() > (0.9999 if solver == "dense" else 0.99)
    # the KNN bank holds the exact projections of the fit samples
    assert torch.allclose(det.transform(fit_x), det.bank_, rtol=1e-4, atol=1e-4 * det.bank_.abs().max().item())
    assert_unchanged(m, snap)


def test_subspace_iteration_recovers_a_low_rank_subspace():
    g = torch.Generator().manual_seed(0)
    n, d, r = 300, 2000, 6
    u = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    w = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
    svals = torch.tensor([50.0, 30.0, 20.0, 10.0, 8.0, 5.0])
    a = (u * svals) @ w.T + 0.05 * torch.randn(n, d, generator=g)
    op = DenseOperator(a)
    v, s, av = randomized_subspace(op, 4, oversample=6, n_iter=3, seed=1)
    assert op.passes == 2 * 3 + 1
    true_v = torch.linalg.svd(a.double(), full_matrices=False).Vh[:4].T
    cos = torch.linalg.svdvals(true_v.T @ v.double())
    assert cos.min() > 0.9999
    assert torch.allclose(s[:4], torch.linalg.svdvals(a.double())[:4], rtol=1e-3)
    assert torch.allclose(av, a.double() @ v.double(), atol=1e-3)
    assert torch.allclose(v.T @ v, torch.eye(4), atol=1e-5)
    # few samples: the exact two-pass path (l reaches the rank bound)
    small = DenseOperator(a[:8])
    _, s2, _ = randomized_subspace(small, 5, oversample=10, n_iter=3)
    assert small.passes == 2
    assert torch.allclose(s2, torch.linalg.svdvals(a[:8].double())[:5], rtol=1e-4)
    with pytest.raises(InputError):
        randomized_subspace(small, 9)


def test_orthonormalize_drops_null_directions():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(500, 3, generator=g)
    p = torch.cat([b, b[:, :1] * 2.0], 1)  # rank 3
    q = orthonormalize(p.clone())
    assert q.shape == (500, 3)
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)


def test_class_mean_variant():
    m = _net()
    x, y, loader = _data()
    det = normscore.create("ldg", subspace="class_mean").fit(m, loader)
    keep = torch.arange(60) % 10 != 9
    slots = det._layer_map().slots
    gfit, _ = _brute_grads(m, x[keep], slots)
    vn = (gfit - det.grad_mean_) * det.inv_std_
    s = det.inv_std_
    v = torch.where(s[:, None] > 0, det.components_ / s.clamp_min(1e-30)[:, None], torch.zeros(()))
    for j, c in enumerate(det.classes_):
        ref = vn[y[keep] == c].mean(0)
        assert torch.allclose(v[:, j], ref / ref.norm(), atol=1e-4)
    assert det.n_components_ == len(det.classes_) == 5


def test_scorings_sketch_and_persistence(tmp_path):
    m = _net()
    _, _, loader = _data()
    xt = torch.randn(6, 3, 10, 10)
    knn = normscore.create("ldg", n_components=6, k=3).fit(m, loader)
    ens = normscore.create("ldg", n_components=6, k=3, scoring="ensemble").fit(m, loader)
    f = normscore.capture(knn.adapter, xt, normscore.CaptureSpec(penultimate=True))
    bank = normscore.detectors.engines.knn.KNNBank()
    bank.add(ens.feature_bank_)
    assert torch.allclose(ens.score(xt), knn.score(xt) - bank.kth_distance(f["penultimate"], 3), atol=1e-5)
    for scoring in ("probe_msp", "probe_energy"):
        det = normscore.create("ldg", n_components=6, scoring=scoring).fit(m, loader)
        s = det.score(xt)
        assert s.shape == (6,) and torch.isfinite(s).all()
        if scoring == "probe_msp":
            assert ((s > 0) & (s <= 1)).all()
        # every scoring is prepared by one fit: switching needs no refit
        switched = normscore.create("ldg", n_components=6).fit(m, loader).set_params(scoring=scoring)
        assert torch.allclose(switched.score(xt), s, atol=1e-6)
    unlabelled = normscore.create("ldg", n_components=6).fit(m, [xb for xb, _ in loader])
    with pytest.raises(ConfigError, match="labelled"):
        unlabelled.set_params(scoring="probe_energy").score(xt)
    sk = normscore.create("ldg", method="sketch", sketch_dim=64, n_components=6).fit(m, loader)
    assert sk.dim_ < knn.dim_ and sk.transform(xt).shape == (6, 6)
    for det in (knn, sk):
        det.save(tmp_path / "l.ns")
        back = normscore.load(tmp_path / "l.ns", model=m)
        assert torch.equal(back.score(xt), det.score(xt))
        assert torch.equal(back.transform(xt), det.transform(xt))


def test_detector_set_and_parameter_sets():
    m = _net()
    _, _, loader = _data()
    xt = torch.randn(4, 3, 10, 10)
    alone = normscore.create("ldg", n_components=5).fit(m, loader)
    ds = normscore.DetectorSet([normscore.create("ldg", n_components=5), "msp", "gradnorm"]).fit(m, loader)
    got = ds.score(xt)
    assert torch.allclose(got["ldg"], alone.score(xt), atol=1e-6)
    assert ds["ldg"].decision.threshold == pytest.approx(alone.decision.threshold, abs=1e-5)
    assert torch.equal(got["msp"], normscore.create("msp").fit(m, loader).score(xt))
    head = normscore.create("ldg", params="head", n_components=5).fit(m, loader)
    assert head.layer_names_ == ["fc"] and head.dim_ == 12 * 5 + 5
    part = normscore.create("ldg", params=["tok", "fc"], n_components=5).fit(m, loader)
    assert part.layer_names_ == ["tok", "fc"]


def test_errors_and_limits():
    m = _net()
    x, _, loader = _data(n=30)
    with pytest.raises(InputError, match="at least 40 ID samples"):
        normscore.create("ldg", n_components=40).fit(m, loader)
    auto = normscore.create("ldg").fit(m, loader)
    assert auto.n_components_ == 27 - 1  # 30 samples - 3 held out, centred rank n - 1
    with pytest.raises(InputError, match="labels"):
        normscore.create("ldg", scoring="probe_msp").fit(m, [xb for xb, _ in loader])
    with pytest.raises(ConfigError):
        normscore.create("ldg", params="everything")
    with pytest.raises(ConfigError):
        normscore.create("ldg", method="vmap")
    with pytest.raises(NotFittedError):
        normscore.create("ldg").transform(x[:2])

    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            g = torch.Generator().manual_seed(self.calls)
            p = torch.randperm(30, generator=g)
            return iter([(x[p[i : i + 10]],) for i in range(0, 30, 10)])

    with pytest.raises(InputError, match="same order"):
        normscore.create("ldg", n_components=3, solver="randomized").fit(m, Shuffled())
    with pytest.raises(InputTypeError, match="one-shot"):
        normscore.create("ldg", n_components=3).fit(m, (b for b in loader))


def test_zero_variance_coordinates_are_dropped():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        m[0].bias[0] = -100.0  # channel 0 is dead: its weights and bias get zero gradient for every input
    _, _, loader = _data(n=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is excluded for this model
        warnings.simplefilter("ignore", CalibrationWarning)  # 4 held-out samples: not what this tests
        det = normscore.create("ldg", n_components=4).fit(m, loader)
    assert det.n_zero_variance_ >= 3 * 9 + 1 + 3
    assert (det.inv_std_[: 3 * 9] == 0).all()
    assert (det.components_[: 3 * 9] == 0).all()
    assert torch.isfinite(det.transform(torch.randn(3, 3, 10, 10))).all()


def test_excluded_parameters_are_reported():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, depth=2).eval()
    xs = torch.randn(12, 3, 32, 32)
    with pytest.warns(UserWarning, match="left out"):
        det = normscore.create("ldg", n_components=3).fit(vit, [xs[:6], xs[6:]])
    assert det.excluded_parameters_ == ["cls_token", "pos_embed"]
    last = normscore.create("ldg", n_components=3, params=1).fit(vit, [xs[:6], xs[6:]])
    assert last.layer_names_[0].startswith("blocks.1.") and last.layer_names_[-1] == "head"


def test_sign_convention_id_scores_higher():
    """Higher = more ID: with k=1 a fitted ID sample is its own nearest neighbour (distance 0),
    so it gets the highest possible score; anything else scores lower."""
    m = _net()
    x, _, loader = _data(n=40)
    det = normscore.create("ldg", n_components=10, k=1).fit(m, loader)
    fit_x = x[torch.arange(40) % 10 != 9][:8]
    own = det.score(fit_x)
    other = det.score(torch.randn(8, 3, 10, 10) * 3 + 1)
    assert own.abs().max() < 1e-3 and (other < -1e-2).all()


def test_projection_direct_route_for_single_position_layers():
    """Linear on pooled features and convs with a 1x1 output map are projected without forming
    the per-sample gradient; the result equals the brute-force projection."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 2), nn.ReLU(), nn.Flatten(), nn.Linear(6, 3)
    ).eval()
    x = torch.randn(5, 3, 5, 5)
    adapter = normscore.get_adapter(m)
    adapter.ensure_resolved(x)
    eng = ExactGradients(resolve_layers(adapter, "all", x).slots)
    w = torch.randn(eng.dim, 7)
    got = normscore.capture(adapter, x, normscore.CaptureSpec(backward=eng.projection_spec(w, "p")))["p"]
    ref = _brute_grads(m, x, eng.slots)[0] @ w
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
