"""``layer=``: every feature-space detector at a block, on several blocks, or at the NormRatio block.

The reference for a detector at block ``B`` is the *same* detector fitted with ``fit_features``
on hand-made features ``Features(penultimate=<mean over positions of B's output>, logits,
labels)``: the block output is read with a forward hook in this file (not through normscore's
taps) and averaged over spatial positions (over the patch tokens, CLS excluded, for a ViT).
"""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import TinyCNN, assert_unchanged, make_loader, snapshot

import normscore
from normscore.errors import AdapterError, ConfigError, InputError
from normscore.taps import Features, block_key

LOADER = make_loader(n=160, batch=32, classes=10, seed=1)
X = torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(5))

#: detector -> hyperparameters for the small fits; value: compared bitwise (True) or allclose
CASES = {
    "mahalanobis": ({}, True),
    "rmds": ({}, True),
    "mahalanobis_pp": ({}, True),
    "rmds_pp": ({}, True),
    "knn": ({"k": 3}, True),
    "nnguide": ({"k": 3, "alpha": 1.0}, True),
    "she": ({}, True),
    "gmm": ({"reg": 1e-3}, True),
    "neco": ({}, True),
    "cfood": ({}, True),
    "relation": ({}, True),
    "grood": ({}, True),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TinyCNN()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return m.eval()


def _block_out(model, name, x):
    store = {}
    mod = dict(model.named_modules())[name]
    h = mod.register_forward_hook(lambda m, a, o: store.setdefault("out", o.detach().clone()))
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    finally:
        h.remove()
    return store["out"], logits


def _gap(model, name, x, prefix=0):
    out, logits = _block_out(model, name, x)
    if out.ndim == 4:
        return out.float().mean(dim=(2, 3)), logits
    return out[:, prefix:].float().mean(dim=1), logits  # tokens [B, N, C]: patch tokens only


def _hand_feats(model, names, loader, prefix=0):
    out = []
    for x, y in loader:
        parts = [_gap(model, n, x, prefix) for n in names]
        out.append(Features(penultimate=torch.cat([p[0] for p in parts], 1), logits=parts[0][1], labels=y))
    return out


def _unchecked(det):
    """A reference fitted on hand-made features of another width than the model's penultimate:
    drop the shape checks (fingerprint and live model), which would refuse them."""
    det.__dict__.pop("fingerprint_", None)
    det._adapter = None
    return det


def _hand_ref(name, hp, model, names, loader=LOADER, prefix=0):
    ref = normscore.create(name, **hp).attach(model)
    ref.fit_features(_hand_feats(model, names, loader, prefix), calibration=0.0)
    return _unchecked(ref)


def _hand_score(ref, model, names, x, prefix=0):
    parts = [_gap(model, n, x, prefix) for n in names]
    return ref.score_features(Features(penultimate=torch.cat([p[0] for p in parts], 1), logits=parts[0][1]))


def _same(a, b, bitwise):
    if bitwise:
        assert torch.equal(a, b), (a, b)
    else:
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)


# ---------------------------------------------------------------------------------------------
# one block: the detector on the block's pooled features


@pytest.mark.parametrize("name", sorted(CASES))
def test_detector_at_a_block_equals_the_detector_on_hand_pooled_features(model, name):
    hp, bitwise = CASES[name]
    snap = snapshot(model)
    det = normscore.create(name, layer="features.2", **hp).fit(model, LOADER, calibration=0.0)
    assert det.layer_ == "features.2"
    assert set(det.fingerprint.features) >= {block_key("features.2", "gap")}
    assert "penultimate" not in det.fingerprint.features
    ref = _hand_ref(name, hp, model, ["features.2"])
    _same(det.score(X), _hand_score(ref, model, ["features.2"], X), bitwise)
    assert_unchanged(model, snap)


def test_penultimate_is_the_default_and_unchanged(model):
    for name, (hp, _) in CASES.items():
        a = normscore.create(name, **hp)
        assert a.layer == "penultimate" and a.layer_aggregation == "concat"
        spec = a.capture_spec(normscore.get_adapter(model), "score")
        assert spec.penultimate and not spec.blocks
    a = normscore.create("mahalanobis").fit(model, LOADER)
    b = normscore.create("mahalanobis", layer="penultimate").fit(model, LOADER)
    c = normscore.create("mahalanobis").attach(model)
    c.fit_features([f for f in _pen_feats(model)], calibration=0.1)
    assert torch.equal(a.score(X), b.score(X)) and torch.equal(a.score(X), c.score(X))
    assert a.layer_ == "penultimate"


def _pen_feats(model):
    out = []
    for x, y in LOADER:
        with torch.no_grad():
            h = model.features(x)
            out.append(Features(penultimate=h, logits=model.fc(h), labels=y))
    return out


def test_token_blocks_pool_the_patch_tokens():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, depth=2).eval()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(24, 3, 32, 32, generator=g), torch.arange(24) % 4) for _ in range(2)]
    det = normscore.create("mahalanobis", layer="blocks.0", shrinkage=0.1).fit(vit, loader, calibration=0.0)
    assert det.adapter.block("blocks.0").prefix_tokens == 1
    ref = _hand_ref("mahalanobis", {"shrinkage": 0.1}, vit, ["blocks.0"], loader, prefix=1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    _same(det.score(x), _hand_score(ref, vit, ["blocks.0"], x, prefix=1), False)


# ---------------------------------------------------------------------------------------------
# several blocks


@pytest.mark.parametrize("name", ["mahalanobis", "knn", "neco"])
def test_concat_is_the_detector_on_concatenated_features(model, name):
    hp, bitwise = CASES[name]
    names = ["features.2", "features.6"]
    det = normscore.create(name, layer=names, layer_aggregation="concat", **hp).fit(model, LOADER, calibration=0.0)
    assert det.layer_ == names
    ref = _hand_ref(name, hp, model, names)
    _same(det.score(X), _hand_score(ref, model, names, X), bitwise)


@pytest.mark.parametrize("name", ["mahalanobis", "rmds_pp", "knn", "gmm"])
def test_sum_is_the_sum_of_per_block_detectors(model, name):
    hp, _ = CASES[name]
    names = ["features.2", "features.6"]
    det = normscore.create(name, layer=names, layer_aggregation="sum", **hp).fit(model, LOADER, calibration=0.0)
    assert det.layer_ == names
    ref = sum(_hand_score(_hand_ref(name, hp, model, [n]), model, [n], X).double() for n in names)
    _same(det.score(X), ref.float(), False)
    assert set(det.fingerprint.features) == {block_key(n, "gap") for n in names}


def test_stage_ends_sum_of_mahalanobis_is_multi_mahalanobis(model):
    det = normscore.create("mahalanobis", layer="*stages", layer_aggregation="sum").fit(model, LOADER)
    ens = normscore.create("multi_mahalanobis").fit(model, LOADER)
    assert det.layer_ == ens.layers_ == normscore.get_adapter(model).stage_ends
    assert torch.allclose(det.score(X), ens.score(X), rtol=1e-5, atol=1e-4)


def test_fixed_blocks_share_the_one_fit_pass(model):
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        ds = normscore.DetectorSet(
            [
                normscore.create("mahalanobis"),
                normscore.create("knn", k=3, layer="features.2"),
                normscore.create("she", layer=["features.2", "features.6"], layer_aggregation="sum"),
            ]
        ).fit(model, LOADER)
    finally:
        h.remove()
    assert sum(calls) == 160  # one forward pass over the fit data for all three
    assert ds["she"].layer_ == ["features.2", "features.6"]


# ---------------------------------------------------------------------------------------------
# normratio


def test_normratio_selects_featurenorms_block_and_equals_fitting_there(model):
    snap = snapshot(model)
    det = normscore.create("knn", k=3, layer="normratio").fit(model, LOADER)
    fn = normscore.create("featurenorm").fit(model, LOADER)
    assert det.layer_ == fn.block_ and det.layer_table_ == fn.block_report_
    assert det.fit_mode == "multi_pass" and type(det).fit_mode == "single_pass"
    fixed = normscore.create("knn", k=3, layer=det.layer_).fit(model, LOADER)
    assert fixed.fit_mode == "single_pass"
    assert torch.equal(det.score(X), fixed.score(X))
    assert det.decision_.threshold == fixed.decision_.threshold
    assert_unchanged(model, snap)


def test_normratio_picks_another_block_than_the_last(model):
    """On a model built so that NormRatio prefers its middle block, the detector follows it."""
    from test_featurenorm import _ramps, _Separable

    torch.manual_seed(0)
    sep = _Separable().eval()
    adapter = normscore.Adapter(sep, blocks=["pw", "smooth", "rough"])
    x = _ramps(60)
    loader = [(x[i : i + 20], torch.arange(20) % 3) for i in range(0, 60, 20)]
    det = normscore.create("mahalanobis", layer="normratio", shrinkage=0.1).fit(sep, loader, adapter=adapter)
    assert det.layer_ == "smooth"
    assert [r["block"] for r in det.layer_table_] == ["pw", "smooth", "rough"]
    fixed = normscore.create("mahalanobis", layer="smooth", shrinkage=0.1).fit(sep, loader, adapter=adapter)
    xt = _ramps(5, seed=3)
    assert torch.equal(det.score(xt), fixed.score(xt))


def test_normratio_needs_the_model(model):
    det = normscore.create("mahalanobis", layer="normratio").attach(model)
    with pytest.raises(ConfigError, match="need the model during fit"):
        det.fit_features(_pen_feats(model))
    with pytest.raises(normscore.errors.NotFittedError, match="normratio"):
        det.capture_spec(det.adapter, "score")


# ---------------------------------------------------------------------------------------------
# persistence, shape checks, the bench's cached path


@pytest.mark.parametrize(
    "hp",
    [
        {"layer": "features.2"},
        {"layer": ["features.2", "features.6"], "layer_aggregation": "sum"},
        {"layer": "normratio"},
    ],
)
def test_save_load_round_trip(model, tmp_path, hp):
    det = normscore.create("rmds", **hp).fit(model, LOADER)
    p = str(tmp_path / "d.nsd")
    det.save(p)
    back = normscore.load(p, model=model)
    assert back.layer_ == det.layer_ and back.get_params() == det.get_params()
    if hp["layer"] == "normratio":
        assert back.layer_table_ == det.layer_table_
    assert torch.equal(back.score(X), det.score(X))


def test_block_features_of_the_wrong_width_are_refused(model):
    det = normscore.create("mahalanobis", layer="features.2").fit(model, LOADER)
    with pytest.raises(InputError, match=r"block:features.2:gap"):
        det.score_features(Features({block_key("features.2", "gap"): torch.randn(3, 5)}))


def test_bench_cached_path_uses_the_layer_keys(model):
    from normscore.bench.cache import spec_keys
    from normscore.bench.cached import fit_cached, score_cached

    adapter = normscore.get_adapter(model)
    for hp in ({"layer": "features.2"}, {"layer": ["features.2", "features.6"], "layer_aggregation": "sum"}):
        det = normscore.create("mahalanobis", **hp).attach(model, adapter)
        keys = spec_keys(det.capture_spec(adapter, "fit"), adapter) | spec_keys(
            det.capture_spec(adapter, "score"), adapter
        )
        assert "penultimate" not in keys and block_key("features.2", "gap") in keys
        spec = det.capture_spec(adapter, "fit") | det.capture_spec(adapter, "score")
        parts = []
        for x, y in LOADER:
            f = normscore.capture(adapter, x, spec)
            f["labels"] = y
            parts.append(f)
        fit_cached(det, Features.cat(parts), 160, adapter, torch.device("cpu"))
        live = normscore.create("mahalanobis", **hp).fit(model, LOADER, calibration=0.0)
        test = normscore.capture(adapter, X, det.capture_spec(adapter, "score"))
        assert torch.equal(
            torch.from_numpy(score_cached(det, test, adapter, torch.device("cpu"))).float(), live.score(X)
        )


# ---------------------------------------------------------------------------------------------
# errors


def test_unknown_block_names_the_valid_ones(model):
    normscore.get_adapter(model).ensure_resolved(X)
    with pytest.raises((ConfigError, AdapterError), match=r"Did you mean 'features.2'\?.*Valid blocks"):
        normscore.create("knn", k=3, layer="feature.2").fit(model, LOADER)
    fresh = TinyCNN().eval()  # an adapter that has not seen an input: the capture names them
    with pytest.raises((ConfigError, AdapterError), match=r"Did you mean 'features.2'\?"):
        normscore.create("mahalanobis", layer="feature.2").fit(fresh, LOADER)


@pytest.mark.parametrize("name", ["vim", "residual", "fdbd"])
def test_head_dependent_detectors_refuse_other_layers(name):
    assert normscore.create(name, layer="penultimate").layer == "penultimate"
    with pytest.raises(ConfigError, match=r"not available: .*head"):
        normscore.create(name, layer="features.2")
    with pytest.raises(ConfigError, match="not available"):
        normscore.create(name).set_params(layer="normratio")


@pytest.mark.parametrize(
    "hp",
    [
        {"layer": ""},
        {"layer": []},
        {"layer": ["a", "a"]},
        {"layer": ["a", "normratio"]},
        {"layer": 3},
        {"layer_aggregation": "mean"},
    ],
)
def test_bad_layer_values_are_rejected(hp):
    with pytest.raises(ConfigError):
        normscore.create("mahalanobis", **hp)


# ---------------------------------------------------------------------------------------------
# torch.distributed: the per-block members' fit state is synchronised (one gloo rank in-process)


def test_sum_members_and_normratio_synchronise_under_a_process_group(model, tmp_path):
    import torch.distributed as dist

    hps = [
        ("knn", {"k": 3, "layer": ["features.2", "features.6"], "layer_aggregation": "sum"}),
        ("gmm", {"reg": 1e-3, "layer": "*stages", "layer_aggregation": "sum"}),
        ("mahalanobis", {"layer": "normratio"}),
    ]
    alone = [normscore.create(n, **hp).fit(model, LOADER).score(X) for n, hp in hps]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        synced = [normscore.create(n, **hp).fit(model, LOADER).score(X) for n, hp in hps]
    finally:
        dist.destroy_process_group()
    for a, b in zip(alone, synced):
        assert torch.equal(a, b)


def test_changing_the_layer_after_fitting_asks_for_a_refit(model):
    det = normscore.create("knn", k=3, layer="features.2").fit(model, LOADER)
    det.set_params(layer="features.6")
    with pytest.raises(ConfigError, match="Refit the detector"):
        det.score(X)
    det.fit(model, LOADER)
    assert det.layer_ == "features.6" and det.score(X).shape == (7,)
