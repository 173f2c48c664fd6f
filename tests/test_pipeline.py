"""ScoringModule (hooks and hook-free), export paths, batch scoring, fusion, production examples."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from helpers import assert_unchanged, make_loader, snapshot

import normscore
from normscore.errors import ConfigError
from normscore.pipeline import ScoringModule, exportable, score_loader

ROOT = Path(__file__).resolve().parents[1]
FORWARD = ["msp", "energy", "penultimate_norm"]


def _models():
    torch.manual_seed(0)
    return {
        "resnet18": timm.create_model("resnet18", num_classes=5).eval(),
        "vit": timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32).eval(),
        "tv-mobilenet": torchvision.models.mobilenet_v3_small(num_classes=5).eval(),
    }


@pytest.mark.parametrize("arch", ["resnet18", "vit", "tv-mobilenet"])
def test_scoring_module_equals_model_and_detectors(arch):
    model = _models()[arch]
    x = torch.randn(6, 3, 32, 32)
    ds = normscore.DetectorSet(FORWARD).fit(model, make_loader(n=30, size=32, classes=5))
    snap = snapshot(model)
    sm = ScoringModule(model, ds)
    with torch.no_grad():
        ref_logits = model(x)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            logits, scores = sm(x)
        assert torch.allclose(logits, ref_logits, atol=1e-5)
        alone = ds.score(x)
        assert all(torch.equal(scores[k], alone[k]) for k in FORWARD)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
def test_hook_free_path_traces_exports_and_compiles(arch):
    model = _models()[arch]
    x = torch.randn(4, 3, 32, 32)
    ds = normscore.DetectorSet(FORWARD).fit(model, make_loader(n=20, size=32, classes=5))
    ref_logits, ref = ScoringModule(model, ds)(x)
    hf = ScoringModule(model, ds, hook_free=True, example_input=x)
    snap = snapshot(model)
    outs = {"eager": hf(x)}
    outs["jit.trace"] = torch.jit.trace(hf, x, strict=False, check_trace=False)(x)
    outs["export"] = torch.export.export(hf, (x,)).module()(x)
    assert_unchanged(model, snap)
    for how, (logits, scores) in outs.items():
        assert torch.allclose(logits, ref_logits, atol=1e-5), how
        for k in FORWARD:
            assert torch.allclose(scores[k], ref[k], rtol=1e-5, atol=1e-5), (how, k)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape-only conditions, fixed per model
def test_every_exportable_detector_traces_and_exports():
    """All registered detectors that `exportable` accepts, in one hook-free set on timm resnet18:
    jit.trace and torch.export give the hooked scores (knn switches from faiss to its exact torch
    search under tracing, so the trace does not bake in faiss results)."""
    from zoo_helpers import SMALL_DATA_HPARAMS

    model = _models()["resnet18"]
    x = torch.randn(4, 3, 32, 32)
    names = [n for n in normscore.list_detectors() if exportable(normscore.create(n))]
    assert {"knn", "mahalanobis", "vim", "featurenorm", "fusion"} <= set(names)
    dets = [normscore.create(n, **SMALL_DATA_HPARAMS.get(n, {})) for n in names]
    ds = normscore.DetectorSet(dets).fit(model, make_loader(n=40, size=32, classes=5))
    _, ref = ScoringModule(model, ds)(x)
    hf = ScoringModule(model, ds, hook_free=True, example_input=x)
    x2 = torch.randn(4, 3, 32, 32)  # not the example input: nothing may be baked in
    _, ref2 = ScoringModule(model, ds)(x2)
    outs = {
        "jit.trace": torch.jit.trace(hf, x, strict=False, check_trace=False)(x2),
        "export": torch.export.export(hf, (x,)).module()(x2),
    }
    for how, (_, scores) in outs.items():
        for k in ref:
            assert torch.allclose(scores[k], ref2[k], rtol=1e-4, atol=1e-4), (how, k)


def test_torch_compile_of_hook_free_module():
    model = _models()["resnet18"]
    x = torch.randn(2, 3, 32, 32)
    det = normscore.create("energy").fit(model, make_loader(n=10, size=32, classes=5))
    hf = ScoringModule(model, det, hook_free=True, example_input=x)
    _, s = torch.compile(hf)(x)
    assert torch.allclose(s, det.score(x), atol=1e-4)


def test_scoring_module_moves_with_to_and_rejects_foreign_detectors():
    a, b = _models()["resnet18"], _models()["vit"]
    det = normscore.create("penultimate_norm").fit(a, make_loader(n=10, size=32, classes=5))
    sm = ScoringModule(a, det).to(torch.float64).to("cpu")
    assert next(sm.model.parameters()).dtype == torch.float64
    with pytest.raises(ConfigError, match="different model"):
        ScoringModule(b, det)


def test_exportable_flags():
    assert exportable(normscore.create("energy"))
    for name in normscore.list_detectors(needs_gradients=True):
        assert not exportable(normscore.create(name))


def test_score_loader_matches_score_and_returns_logits(tiny_model, loader):
    ds = normscore.DetectorSet(FORWARD).fit(tiny_model, loader)
    scores, logits = score_loader(ds, loader, return_logits=True, progress=False)
    xs = torch.cat([b[0] for b in loader])
    direct = ds.score(xs)
    for k in FORWARD:
        assert torch.allclose(scores[k], direct[k], atol=1e-5)
    assert logits.shape == (48, 10)
    single = score_loader(ds["energy"], loader, progress=False, max_samples=20)
    assert single.shape == (20,)


def test_fusion_is_a_detector_everywhere(tiny_model, tmp_path):
    loader = make_loader(n=120, batch=30)
    x = torch.randn(8, 3, 16, 16)
    fus = normscore.create("fusion", members=["msp", "energy", {"name": "energy", "temperature": 2.0}])
    fus.fit(tiny_model, loader)
    s = fus.score(x)
    assert s.shape == (8,) and float(s.min()) >= 0 and float(s.max()) <= 1
    # ECDF fusion is the mean of the members' held-out ranks
    ms = [normscore.create("msp"), normscore.create("energy"), normscore.create("energy", temperature=2.0)]
    held = torch.cat([b[0] for b in loader])[9::10]
    ranks = []
    for m in ms:
        m.attach(tiny_model)
        ref, sx = m.score(held), m.score(x)
        ranks.append(((ref[None] < sx[:, None]).float() + 0.5 * (ref[None] == sx[:, None]).float()).mean(1))
    assert torch.allclose(s, torch.stack(ranks).mean(0), atol=1e-6)
    fus.save(tmp_path / "f.ns")
    assert torch.equal(normscore.load(tmp_path / "f.ns", model=tiny_model).score(x), s)
    ds = normscore.DetectorSet([fus, "msp"]).fit(tiny_model, loader)
    assert torch.equal(ds.score(x)["fusion"], s)
    with pytest.raises(ConfigError, match="calibration > 0"):
        normscore.create("fusion").fit(tiny_model, loader, calibration=0.0)
    with pytest.raises(ConfigError, match="Did you mean"):
        normscore.create("fusion", members=["enrgy"])
    assert torch.equal(
        normscore.create("fusion", method="zscore").fit(tiny_model, loader).score(x).isfinite(),
        torch.ones(8, dtype=torch.bool),
    )


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist missing")
@pytest.mark.parametrize("example", ["inference_gate.py", "distributed_scoring.py", "load_in_fresh_process.py"])
def test_production_examples_run(example, tmp_path):
    env = dict(os.environ, EXAMPLE_PORT=str(29500 + os.getpid() % 400), OMP_NUM_THREADS="1")
    args = [sys.executable, str(ROOT / "docs" / "examples" / example)]
    if example == "distributed_scoring.py":
        args.append(str(tmp_path))
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    if example == "inference_gate.py":  # the gate keeps ~95% of ID and rejects the digits
        rates = dict(re.findall(r"^(\S+).*accepted \d+/\d+ \((\d+)%\)", r.stdout, re.M))
        assert int(rates["fashion"]) >= 90 and int(rates["digits"]) <= 10, r.stdout
    if example == "distributed_scoring.py":
        scores = torch.load(tmp_path / "scores.pt", weights_only=True)
        assert set(scores) == {"msp", "energy", "penultimate_norm"} and scores["msp"].shape == (1000,)


def test_fusion_with_members_that_need_their_fit_to_know_what_to_capture(tiny_model):
    """featurenorm (block chosen by the fit) and ldg (projection from the fit) have no score spec
    before they are fitted; fusion must fit them first and then calibrate and score them."""
    loader = make_loader(n=60, batch=20)
    x = torch.randn(5, 3, 16, 16)
    members = ["energy", "featurenorm", {"name": "ldg", "n_components": 4, "params": "head"}]
    fus = normscore.create("fusion", members=members).fit(tiny_model, loader)
    s = fus.score(x)
    assert s.shape == (5,) and bool(s.isfinite().all())
    assert fus.decision is not None and fus.decision.n == 6
