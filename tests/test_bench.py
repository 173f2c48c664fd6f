"""normscore-bench internals: the feature cache (reuse, missing keys, keys, resume), live
detectors, the hyperparameter search, the training cache and model resolution."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from bench_helpers import LIVE_NAME, Counter, live_detector_registered, save_checkpoint

import normscore.bench.cache as cache_mod
from normscore.bench import BenchConfig, run_benchmark
from normscore.bench.cache import FeatureCache, spec_for_keys, spec_keys
from normscore.bench.models import InputFormat, build_model, load_checkpoint, weights_hash
from normscore.errors import ConfigError, MissingResourceError
from normscore.models import SmallCNN
from normscore.taps import CaptureSpec


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(str(tmp_path_factory.mktemp("ck") / "smallcnn.pt"))


def _cfg(tmp_path, ckpt, **kw):
    base = {
        "checkpoint": ckpt,
        "limit": 32,
        "detectors": "msp,energy",
        "near": ["mnist-5k"],
        "far": ["noise", "textures"],
        "cache_dir": str(tmp_path / "cache"),
        "out": None,
        "progress": False,
        "plots": False,
    }
    base.update(kw)
    return BenchConfig(**base)


@pytest.fixture
def counters(monkeypatch):
    cap = Counter(cache_mod.capture)
    monkeypatch.setattr(cache_mod, "capture", cap)
    fwd = Counter(SmallCNN.forward)
    monkeypatch.setattr(SmallCNN, "forward", lambda self, x: fwd(self, x))
    return cap, fwd


def test_spec_keys_round_trip():
    spec = CaptureSpec(logits=True, penultimate=True, blocks=frozenset({("blocks.1", "gap")}), views=frozenset({"v"}))
    keys = spec_keys(spec)
    assert keys == {
        "logits",
        "penultimate",
        "block:blocks.1:gap",
        "v|logits",
        "v|penultimate",
        "v|block:blocks.1:gap",
    }
    assert spec_for_keys({"block:blocks.1:gap"}) == CaptureSpec(logits=False, blocks=frozenset({("blocks.1", "gap")}))
    assert spec_keys(spec_for_keys(keys)) == keys

    class _A:
        block_names = ["b0", "b1"]

    wild = CaptureSpec(logits=False, blocks=frozenset({("*", "featurenorm")}))
    assert spec_keys(wild, _A()) == {"block:b0:featurenorm", "block:b1:featurenorm"}
    with pytest.raises(ValueError):
        spec_keys(CaptureSpec(backward=object()))  # type: ignore[arg-type]


def test_second_run_extracts_nothing_and_new_detectors_only_missing_keys(tmp_path, ckpt, counters):
    cap, fwd = counters
    r1 = run_benchmark(_cfg(tmp_path, ckpt))
    tests = ("id", "mnist-5k", "noise", "textures")
    assert cap.calls > 0 and {r1.results["splits"][k]["cache"] for k in tests} == {"extracted"}
    cap.calls = fwd.calls = 0
    r2 = run_benchmark(_cfg(tmp_path, ckpt))
    assert cap.calls == 0
    assert fwd.calls == 1  # only the adapter's one-sample probe
    assert all(s["rows_extracted"] == 0 for s in r2.results["splits"].values())
    for det in ("msp", "energy"):
        for k, v in r1.scores[det].items():
            np.testing.assert_array_equal(v, r2.scores[det][k])
    # a new detector needing the penultimate features: one pass per test split for that key only
    cap.calls = 0
    r3 = run_benchmark(_cfg(tmp_path, ckpt, detectors="msp,energy,penultimate_norm"))
    assert cap.calls == 4  # id + 3 OOD sets, one batch each
    assert r3.results["splits"]["id"]["rows_extracted"] == 32
    model_dir = os.path.join(str(tmp_path / "cache"), "features", r3.results["model"]["weights_sha256"][:24])
    groups = []
    for sd in os.listdir(model_dir):
        for g in os.listdir(os.path.join(model_dir, sd)):
            done = os.path.join(model_dir, sd, g, "done.json")
            if os.path.isfile(done):
                with open(done) as f:
                    groups.append(tuple(json.load(f)["keys"]))
    assert sorted(set(groups)) == [("logits",), ("penultimate",)]
    np.testing.assert_array_equal(r3.scores["msp"]["id"], r1.scores["msp"]["id"])


def test_cache_keys_change_with_weights_and_format(tmp_path, ckpt, counters):
    cap, _ = counters
    ds = torch.utils.data.TensorDataset(torch.zeros(3))
    ds.fingerprint = lambda: "f"  # type: ignore[attr-defined]
    fc = FeatureCache(str(tmp_path / "c"))
    a = FeatureCache.split_key(ds, name="x", split="test", data_root=None, fmt=InputFormat(1, (28, 28)).describe())
    b = FeatureCache.split_key(ds, name="x", split="test", data_root=None, fmt=InputFormat(1, (32, 32)).describe())
    c = FeatureCache.split_key(
        ds, name="x", split="test", data_root=None, fmt=InputFormat(1, (28, 28), mean=(0.5,), std=(0.2,)).describe()
    )
    assert len({fc.split_dir("m", a), fc.split_dir("m", b), fc.split_dir("m", c)}) == 3
    assert fc.split_dir("m1", a) != fc.split_dir("m2", a)
    run_benchmark(_cfg(tmp_path, ckpt))
    cap.calls = 0
    other = save_checkpoint(str(tmp_path / "other.pt"), seed=1)
    r = run_benchmark(_cfg(tmp_path, other))  # other weights: everything again
    assert cap.calls == 4 and r.results["splits"]["id"]["cache"] == "extracted"
    cap.calls = 0
    r = run_benchmark(_cfg(tmp_path, ckpt, image_size=32))  # other transform: everything again
    assert cap.calls == 4 and r.results["model"]["input_format"]["size"] == [32, 32]
    cap.calls = 0
    run_benchmark(_cfg(tmp_path, ckpt))
    assert cap.calls == 0


def test_interrupted_run_resumes_without_redoing_finished_splits(tmp_path, ckpt, monkeypatch):
    kw = {"batch_size": 8, "part_rows": 16, "far": ["noise"]}
    # fail in the middle of the second split (mnist-5k): id = 4 batches of 8, then 3 more
    failing = Counter(cache_mod.capture, fail_after=7)
    monkeypatch.setattr(cache_mod, "capture", failing)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_benchmark(_cfg(tmp_path, ckpt, **kw))
    cap = Counter(failing.fn)
    monkeypatch.setattr(cache_mod, "capture", cap)
    res = run_benchmark(_cfg(tmp_path, ckpt, **kw))
    sp = res.results["splits"]
    assert sp["id"]["rows_extracted"] == 0 and sp["id"]["cache"] == "cached"
    assert sp["mnist-5k"]["resumed_rows"] == 16  # one finished part of 16 rows kept
    assert sp["mnist-5k"]["rows_extracted"] == 32 - 16
    assert sp["noise"]["rows_extracted"] == 32
    ref = run_benchmark(_cfg(tmp_path, ckpt, no_cache=True, **kw))
    for k, v in ref.scores["energy"].items():
        np.testing.assert_allclose(res.scores["energy"][k], v, rtol=1e-5, atol=1e-5)


def test_search_chooses_by_validation_auroc_and_records_the_choice(tmp_path, ckpt):
    with live_detector_registered():
        res = run_benchmark(_cfg(tmp_path, ckpt, detectors=f"energy,msp,{LIVE_NAME}", search=True, val_size=24))
    r = res.results
    assert r["validation"]["ood"]["dataset"] == "opencv-photos" and r["splits"]["val-id"]["size"] == 24
    assert "disjoint" in r["validation"]["id"]
    e = r["detectors"]["energy"]
    trace = e["search"]
    assert [t["params"]["temperature"] for t in trace] == [0.5, 1.0, 2.0, 5.0, 10.0]
    aucs = [t["val_auroc"] for t in trace]
    assert e["params"]["temperature"] == trace[int(np.argmax(aucs))]["params"]["temperature"]
    assert r["detectors"]["msp"]["search"] is None  # nothing to search
    live = r["detectors"][LIVE_NAME]
    assert live["mode"] == "live" and len(live["search"]) == 2
    assert live["search"][0]["val_auroc"] == live["search"][1]["val_auroc"]  # a shift does not change ranks
    assert live["params"]["shift"] == 0.0  # ties: the first in grid order
    # the validation ID images are not among the fit images
    with pytest.raises(ConfigError, match="disjoint"):
        run_benchmark(_cfg(tmp_path, ckpt, search=True, val_ood="noise"))


def test_live_detectors_run_with_the_model_and_cache_their_scores(tmp_path, ckpt, counters):
    _, fwd = counters
    with live_detector_registered():
        r1 = run_benchmark(_cfg(tmp_path, ckpt, detectors=f"msp,{LIVE_NAME}", live_fit_size=16))
        d = r1.results["detectors"][LIVE_NAME]
        assert d["mode"] == "live" and "feature_only" in d["why_live"] and d["error"] is None
        assert r1.results["id"]["live_fit_size"] == 16
        assert 0.0 <= d["metrics"]["near"]["auroc"] <= 1.0
        fwd.calls = 0
        r2 = run_benchmark(_cfg(tmp_path, ckpt, detectors=f"msp,{LIVE_NAME}", live_fit_size=16))
        assert fwd.calls == 1 and sorted(r2.results["detectors"][LIVE_NAME]["live_scores_from_cache"]) == sorted(
            ["id", "mnist-5k", "noise", "textures"]
        )
        np.testing.assert_array_equal(r1.scores[LIVE_NAME]["noise"], r2.scores[LIVE_NAME]["noise"])


def test_a_broken_detector_is_reported_not_fatal(tmp_path, ckpt):
    # no --limit: the fit and test sizes cap the splits; nnguide's k=100 > bank of 40 * alpha fails
    res = run_benchmark(_cfg(tmp_path, ckpt, detectors="msp,nnguide", limit=None, fit_size=40, test_size=24))
    assert res.results["id"]["fit_size"] == 40 and res.results["id"]["test_size"] == 24
    assert {o["size"] for o in res.results["ood"]} == {24}
    assert res.failed == ["nnguide"] and "nnguide" in res.results["detectors"]["nnguide"]["error"]
    assert res.results["detectors"]["msp"]["metrics"]["far"]["auroc"] > 0


def test_training_is_cached_by_recipe(tmp_path):
    kw = {
        "checkpoint": None,
        "model": "smallcnn",
        "train_epochs": 1,
        "limit": 64,
        "train_batch_size": 32,
        "detectors": "msp",
        "near": ["mnist-5k"],
        "far": [],
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "plots": False,
    }
    r1 = run_benchmark(BenchConfig(**kw)).results["model"]
    r2 = run_benchmark(BenchConfig(**kw)).results["model"]
    assert r1["weights"] == "trained" and r1["training"]["cached"] is False and r2["training"]["cached"] is True
    assert r1["weights_sha256"] == r2["weights_sha256"]
    rec = r1["training"]["recipe"]
    assert rec["arch"] == "smallcnn" and rec["epochs"] == 1 and rec["seed"] == 0 and rec["trainer"]
    r3 = run_benchmark(BenchConfig(**{**kw, "seed": 1})).results["model"]
    assert r3["training"]["cached"] is False and r3["weights_sha256"] != r1["weights_sha256"]
    assert os.path.isfile(r2["training"]["checkpoint"])


def test_model_resolution_and_clear_weight_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    native = InputFormat(1, (28, 28))
    kw = {"num_classes": 10, "in_chans": 1, "checkpoint": None, "train": False, "native_format": native}
    with pytest.raises(MissingResourceError, match="--checkpoint"):
        build_model("resnet18", **kw)
    with pytest.raises(MissingResourceError, match="--checkpoint") as e:
        build_model("tv:resnet18", **kw)
    assert os.path.join(str(tmp_path / "torch"), "hub", "checkpoints") in str(e.value)
    with pytest.raises(ConfigError, match="tv:"):
        build_model("no_such_net", **kw)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_model("smallcnn", **kw)
    # a torchvision file already in the torch hub cache is used, never downloaded
    import torchvision

    w = torchvision.models.get_model_weights("resnet18").DEFAULT
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    ref = torchvision.models.resnet18(num_classes=1000)
    torch.save(ref.state_dict(), hub / os.path.basename(w.url))
    lm = build_model("tv:resnet18", **{**kw, "num_classes": 1000})
    assert lm.weights == "pretrained" and lm.format.size == (224, 224) and lm.format.channels == 3
    assert weights_hash(lm.model) == weights_hash(ref)
    # a timm checkpoint trained here on gray 28 px images keeps that format
    import timm

    m = timm.create_model("resnet18", num_classes=10, in_chans=1)
    torch.save(m.state_dict(), tmp_path / "r18.pt")
    lm = build_model("resnet18", **{**kw, "checkpoint": str(tmp_path / "r18.pt")})
    assert lm.weights == "checkpoint" and lm.format.channels == 1 and lm.format.size == (28, 28)
    # pickled objects are refused; mismatching checkpoints say why
    torch.save(m, tmp_path / "module.pt")
    with pytest.raises(ConfigError, match="weights_only"):
        load_checkpoint(str(tmp_path / "module.pt"))
    with pytest.raises(ConfigError, match="does not fit"):
        build_model("smallcnn", **{**kw, "checkpoint": str(tmp_path / "r18.pt")})


def test_bench_config_reads_a_string_of_sets_as_a_list():
    """BenchConfig(near="mnist-5k") used to fail with "unknown dataset 'm'" (a string iterated)."""
    from normscore.bench.runner import BenchConfig

    cfg = BenchConfig(near="mnist-5k", far="textures, noise", ood=["photos"])
    assert cfg.near == ["mnist-5k"] and cfg.far == ["textures", "noise"] and cfg.ood == ["photos"]
