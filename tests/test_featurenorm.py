"""FeatureNorm, the jigsaw and NormRatio block selection."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import TinyCNN, assert_unchanged, make_loader, snapshot
from torch import nn

import normscore
from normscore.detectors.engines.jigsaw import jigsaw, jigsaw_permutations, jigsaw_view
from normscore.errors import AdapterError, ConfigError
from normscore.taps import ALL_BLOCKS, CaptureSpec, block_key, view_key

# ---------------------------------------------------------------------------------------------
# FeatureNorm itself


def _hook_output(model, name, x):
    store = {}
    mod = dict(model.named_modules())[name]
    h = mod.register_forward_hook(lambda m, a, o: store.setdefault("out", o.detach().clone()))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        h.remove()
    return store["out"]


def _hand_featurenorm_nchw(a):
    out = []
    for b in range(a.shape[0]):
        per_channel = []
        for c in range(a.shape[1]):
            s = 0.0
            for v in a[b, c].flatten().tolist():
                s += max(v, 0.0) ** 2
            per_channel.append(s**0.5)
        out.append(sum(per_channel) / len(per_channel))
    return torch.tensor(out)


def test_featurenorm_equals_hand_computation(tiny_model):
    det = normscore.create("featurenorm", block="features.2").fit(tiny_model, make_loader())
    assert det.block_ == "features.2"
    x = torch.randn(3, 3, 16, 16)
    ref = _hand_featurenorm_nchw(_hook_output(tiny_model, "features.2", x))
    assert torch.allclose(det.score(x), ref, rtol=1e-5, atol=1e-6)
    # pre-activation output: the ReLU inside FeatureNorm matters (negative values are dropped)
    a = torch.tensor([[[[3.0, -4.0], [0.0, 0.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    info = normscore.BlockInfo("b", "nchw")
    from normscore.taps import reduce_block

    assert reduce_block(a, info, "featurenorm").item() == pytest.approx((3.0 + 0.0) / 2)


def test_token_analogue_excludes_prefix_tokens():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    det = normscore.create("featurenorm", block="blocks.3").fit(vit, [torch.randn(8, 3, 32, 32)])
    tok = _hook_output(vit, "blocks.3", x)  # [B, 1 + 4 patches, 192]
    assert tok.shape[1] == 5 and det.adapter.block("blocks.3").prefix_tokens == 1
    patches = tok[:, 1:].transpose(1, 2)  # channels x patch tokens, CLS excluded
    ref = _hand_featurenorm_nchw(patches[..., None])
    assert torch.allclose(det.score(x), ref, rtol=1e-5, atol=1e-6)
    with_cls = _hand_featurenorm_nchw(tok.transpose(1, 2)[..., None])
    assert not torch.allclose(ref, with_cls)


# ---------------------------------------------------------------------------------------------
# the jigsaw


def _tiles(img, grid):
    _, h, w = img.shape
    th, tw = h // grid, w // grid
    return [img[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw] for i in range(grid) for j in range(grid)]


@pytest.mark.parametrize(("size", "grid"), [(12, 3), (14, 3), (16, 4), (10, 2)])
def test_jigsaw_tiles_are_a_permutation_and_border_is_kept(size, grid):
    x = torch.randn(5, 3, size, size)
    idx = torch.arange(100, 105)
    j = jigsaw(x, idx, grid=grid, seed=7)
    perms = jigsaw_permutations(idx, grid, 7)
    t = (size // grid) * grid
    for b in range(5):
        src, dst = _tiles(x[b, :, :t, :t], grid), _tiles(j[b, :, :t, :t], grid)
        p = perms[b].tolist()
        assert sorted(p) == list(range(grid * grid)) and p != list(range(grid * grid))  # never the identity
        for pos, s in enumerate(p):
            assert torch.equal(dst[pos], src[s])
        assert torch.equal(j[b, :, t:, :], x[b, :, t:, :]) and torch.equal(j[b, :, :, t:], x[b, :, :, t:])
        assert not torch.equal(j[b], x[b])
    assert j.shape == x.shape and j.dtype == x.dtype


def test_jigsaw_is_reproducible_and_batch_size_independent():
    x = torch.randn(12, 1, 9, 9)
    idx = torch.arange(40, 52)
    full = jigsaw(x, idx, seed=3)
    assert torch.equal(full, jigsaw(x, idx, seed=3))
    parts = torch.cat([jigsaw(x[i : i + 5], idx[i : i + 5], seed=3) for i in range(0, 12, 5)])
    singles = torch.cat([jigsaw(x[i : i + 1], idx[i : i + 1], seed=3) for i in range(12)])
    assert torch.equal(full, parts) and torch.equal(full, singles)
    assert not torch.equal(full, jigsaw(x, idx, seed=4))
    assert not torch.equal(jigsaw_permutations(idx, 3, 3), jigsaw_permutations(idx + 1000, 3, 3))
    with pytest.raises(ValueError, match="too small"):
        jigsaw(torch.randn(1, 1, 2, 2), grid=3)


def test_view_pairs_each_image_with_its_own_jigsaw_of_the_preprocessed_input(tiny_model):
    adapter = normscore.get_adapter(tiny_model)
    x = torch.randn(6, 3, 16, 16)
    idx = torch.arange(20, 26)
    view = jigsaw_view(3, 0)
    spec = CaptureSpec(logits=False, blocks=frozenset({(ALL_BLOCKS, "featurenorm")}), views=frozenset({view}))
    f = normscore.capture(adapter, x, spec, index=idx)
    direct = normscore.capture(adapter, jigsaw(x, idx, grid=3, seed=0), CaptureSpec(blocks=spec.blocks))
    for b in adapter.block_names:
        k = block_key(b, "featurenorm")
        assert torch.allclose(f[view_key(view, k)], direct[k], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# NormRatio block selection


class _Pointwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class _Smooth(nn.Module):
    """High where the image is locally smooth: a jigsaw's seams lower its norm."""

    def forward(self, x):
        dx = (x[..., :-1, 1:] - x[..., :-1, :-1]).abs()
        dy = (x[..., 1:, :-1] - x[..., :-1, :-1]).abs()
        return torch.relu(0.3 - dx - dy)


class _Rough(nn.Module):
    """High at strong local changes: a jigsaw's seams raise its norm."""

    def forward(self, x):
        return torch.relu((x[..., :, 1:] - x[..., :, :-1]).abs() - 0.1)


class _Separable(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw, self.smooth, self.rough = _Pointwise(), _Smooth(), _Rough()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        feats = [self.pw(x).mean((2, 3)), self.smooth(x).mean((2, 3)), self.rough(x).mean((2, 3))]
        return self.fc(torch.cat(feats, 1))


def _ramps(n, size=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, 2, generator=g).unbind(1)
    h = torch.linspace(0, 1, size)
    img = a[:, None, None] * h[None, :, None] + b[:, None, None] * h[None, None, :]
    return img[:, None] + 0.01 * torch.randn(n, 1, size, size, generator=g)


def test_normratio_selects_the_block_built_to_separate():
    torch.manual_seed(0)
    model = _Separable().eval()
    adapter = normscore.Adapter(model, blocks=["pw", "smooth", "rough"])
    x = _ramps(40)
    loader = [(x[i : i + 16],) for i in range(0, 40, 16)]
    snap = snapshot(model)
    det = normscore.create("featurenorm").fit(model, loader, adapter=adapter)
    rep = {r["block"]: r for r in det.block_report_}
    assert [r["block"] for r in det.block_report_] == ["pw", "smooth", "rough"]
    assert det.block_ == "smooth"
    assert rep["smooth"]["norm_ratio"] > 1.05
    assert rep["pw"]["norm_ratio"] == pytest.approx(1.0, abs=1e-5)  # pointwise: tile order is invisible
    assert rep["rough"]["norm_ratio"] < 1.0
    for r in det.block_report_:
        assert set(r) == {"block", "norm_ratio", "mean_id_norm", "mean_jigsaw_norm"}
        assert r["mean_id_norm"] > 0 and r["mean_jigsaw_norm"] > 0
    # the score separates ID from jigsaws at test time too
    xt = _ramps(20, seed=1)
    assert (det.score(xt) > det.score(jigsaw(xt, torch.arange(20), seed=9))).float().mean() > 0.9
    assert_unchanged(model, snap)
    # mean of per-image ratios (as the official code), not a ratio of means
    view = jigsaw_view(3, 0)
    f = normscore.capture(
        adapter,
        x,
        CaptureSpec(logits=False, blocks=frozenset({("smooth", "featurenorm")}), views=frozenset({view})),
    )
    k = block_key("smooth", "featurenorm")
    held = torch.arange(40) % 10 == 9
    ratios = (f[k] / f[view_key(view, k)])[~held]
    assert rep["smooth"]["norm_ratio"] == pytest.approx(ratios.double().mean().item(), rel=1e-5)


def test_forced_block_cap_and_errors(tiny_model):
    loader = make_loader(n=48)
    det = normscore.create("featurenorm", block="features.6", max_fit_samples=10).fit(tiny_model, loader)
    assert det.block_ == "features.6" and det.n_normratio_samples_ == 10
    assert len(det.block_report_) == len(normscore.get_adapter(tiny_model).block_names)
    with pytest.raises(AdapterError, match="Valid blocks"):
        normscore.create("featurenorm", block="features.99").fit(tiny_model, loader)
    with pytest.raises(ConfigError):
        normscore.create("featurenorm", grid=1)
    with pytest.raises(ConfigError):
        normscore.create("featurenorm", on="maxlogit")
    full = normscore.create("featurenorm").fit(tiny_model, loader)
    assert full.n_normratio_samples_ == 48 - 4  # calibration hold-out (every 10th) excluded
    none = normscore.create("featurenorm").fit(tiny_model, loader, calibration=0.0)
    assert none.n_normratio_samples_ == 48


@pytest.mark.parametrize("on", ["msp", "energy"])
def test_selected_norm_on_logit_scores(tiny_model, on):
    det = normscore.create("featurenorm", on=on).fit(tiny_model, make_loader())
    x = torch.randn(4, 3, 16, 16)
    adapter = det.adapter
    f = normscore.capture(adapter, x, CaptureSpec(penultimate=True, blocks=frozenset({(det.block_, "featurenorm")})))
    w, b = adapter.head_weight_bias()
    h = f["penultimate"]
    fn = f[block_key(det.block_, "featurenorm")]
    z = (fn[:, None] * h / h.norm(dim=1, keepdim=True)) @ w.t() + b
    ref = torch.softmax(z, 1).amax(1) if on == "msp" else torch.logsumexp(z, 1)
    assert torch.allclose(det.score(x), ref, rtol=1e-5, atol=1e-6)


def test_detector_set_fit_features_and_persistence(tiny_model, tmp_path):
    loader = make_loader(n=48)
    x = torch.randn(5, 3, 16, 16)
    alone = normscore.create("featurenorm").fit(tiny_model, loader)
    ds = normscore.DetectorSet(["featurenorm", "msp", "penultimate_norm"]).fit(tiny_model, loader)
    assert torch.equal(ds.score(x)["featurenorm"], alone.score(x))
    assert ds["featurenorm"].block_report_ == alone.block_report_
    assert ds["featurenorm"].decision == alone.decision
    # cached features: the fit spec (with the jigsaw view) and the calibration spec, in loader order
    det = normscore.create("featurenorm").attach(tiny_model)
    spec = det.capture_spec(det.adapter, "fit") | det.capture_spec(det.adapter, "calibrate")
    cached, seen = [], 0
    for xb, _ in loader:
        cached.append(normscore.capture(det.adapter, xb, spec, index=torch.arange(seen, seen + len(xb))))
        seen += len(xb)
    det.fit_features(cached)
    for a, b in zip(det.block_report_, alone.block_report_):
        assert a["block"] == b["block"] and a["norm_ratio"] == pytest.approx(b["norm_ratio"], rel=1e-6)
    assert det.block_ == alone.block_
    assert torch.allclose(det.score(x), alone.score(x))
    assert det.decision.threshold == pytest.approx(alone.decision.threshold, rel=1e-6)
    det.save(tmp_path / "fn.ns")
    back = normscore.load(tmp_path / "fn.ns", model=tiny_model)
    assert back.block_ == det.block_ and back.block_report_ == det.block_report_
    assert torch.equal(back.score(x), det.score(x))


def test_blocks_resolved_lazily_for_unseen_adapter():
    """The fit spec asks for all blocks before the adapter has seen an input."""
    torch.manual_seed(0)
    model = TinyCNN()
    det = normscore.create("featurenorm")
    assert not normscore.Adapter(model).resolved
    det.fit(model, make_loader(n=20), adapter=normscore.Adapter(model))
    assert det.block_ in det.adapter.block_names
