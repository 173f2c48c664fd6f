"""The normscore-bench command line, end to end on small runs (the full default run is slow)."""

from __future__ import annotations

import csv
import json
import os
import time

import numpy as np
import pytest
from bench_helpers import save_checkpoint
from PIL import Image
from test_data_sets import _fake_imagenet, _img

from normscore.bench.cli import main
from normscore.metrics import evaluate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(str(tmp_path_factory.mktemp("ck") / "smallcnn.pt"))


def test_tiny_end_to_end_run_writes_table_csv_json_and_plots(tmp_path, ckpt, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--limit", "32", "--detectors", "msp,energy,penultimate_norm"]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--seed", "3"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for s in ("mnist-5k", "opencv-digits", "sklearn-digits", "textures", "photos", "noise", "near mean", "fpr95"):
        assert s in text
    assert "ID-positive" in text and "penultimate_norm" in text
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * (6 + 2)
    energy_near = next(r for r in rows if r["detector"] == "energy" and r["ood"] == "near (mean)")
    assert 0.0 <= float(energy_near["auroc"]) <= 100.0 and energy_near["fpr95_oodpos"] != ""  # percent
    # both AUPR conventions, as named in normscore.metrics (OpenOOD's are the *_trapz columns)
    for k in ("aupr_in", "aupr_out", "aupr_in_trapz", "aupr_out_trapz"):
        assert 0.0 <= float(energy_near[k]) <= 100.0, k
    energy_mnist = next(r for r in rows if r["detector"] == "energy" and r["ood"] == "mnist-5k")
    scores = np.load(out / "scores.npz")
    want = evaluate(scores["energy/id"], scores["energy/mnist-5k"])
    for k in ("aupr_in", "aupr_in_trapz", "aupr_out_trapz"):
        assert float(energy_mnist[k]) == pytest.approx(100 * want[k], abs=0.01), k  # percent, 2 decimals
    r = json.loads((out / "results.json").read_text())
    assert "trapezoid" in r["metric_notes"]["aupr_in_trapz"]
    for key in ("normscore", "torch", "timm", "torchvision"):
        assert r["versions"][key]
    assert len(r["model"]["weights_sha256"]) == 64 and r["model"]["checkpoint"] == ckpt
    assert r["seed"] == 3 and r["id"]["test_size"] == 32 and r["id"]["fit_size"] == 32
    assert {o["label"]: o["group"] for o in r["ood"]}["photos"] == "far"
    assert r["detectors"]["energy"]["params"] == {"temperature": 1.0}
    assert r["timings"]["total"] > 0 and "features_test" in r["timings"]
    assert set(r["registered_detectors"]) >= {"msp", "energy", "penultimate_norm"}
    for name in ("hist_msp.png", "roc_energy.png", "summary_auroc.png"):
        with Image.open(out / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert (out / "scores.npz").is_file() and (out / "table.txt").read_text().count("energy") >= 1
    # other print formats from the cache
    assert main([*args, "--format", "markdown", "--no-plots"]) == 0
    assert "| detector | mnist-5k AUROC | mnist-5k fpr95 |" in capsys.readouterr().out
    assert main([*args, "--format", "json", "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["id"]["cache"] == "cached"
    assert not (out / "plots" / "hist_msp.png").exists()  # no stale plots with --no-plots


def test_a_detector_the_model_cannot_run_is_not_applicable_not_failed(tmp_path, ckpt, capsys):
    """mcd needs dropout modules; on a model without any it is listed as not applicable (``n/a``
    cells, its reason in the footer) and the run still succeeds; a real failure exits 1."""
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--limit", "16", "--detectors", "msp,mcd", "--out", str(out)]
    assert main([*args, "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "not applicable mcd: NotApplicableError: mcd where='model' needs dropout modules" in text
    assert "FAILED" not in text
    row = next(line for line in text.splitlines() if line.startswith("mcd "))
    assert "n/a" in row and "err" not in row
    r = json.loads((out / "results.json").read_text())
    assert r["detectors"]["mcd"]["not_applicable"] is True and "not_applicable" not in r["detectors"]["msp"]


def test_usage_errors_exit_2_with_a_reason(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.delenv("NORMSCORE_IMAGENET_ROOT", raising=False)
    base = ["--checkpoint", ckpt, "--limit", "8", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*base, "--detectors", "msp,enrgy"]) == 2
    assert "Did you mean 'energy'" in capsys.readouterr().err
    assert main(["--id", "imagenet", "--detectors", "msp", "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main([*base, "--ood", "no-such-set"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main([*base, "--limit", "0"]) == 2
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "opencv-photos" in listing and "imagefolder:PATH" in listing and "efficientnet_lite0" in listing


def test_everything_missing_is_reported_in_one_message(tmp_path, capsys, monkeypatch):
    """``normscore-bench --model resnet50 --id imagenet``: no weights, an empty train/, no other
    split: one message lists every missing piece; exit 2, no traceback."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no pretrained weights anywhere
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    out = str(tmp_path / "o")
    assert main(["--model", "resnet50", "--id", "imagenet", "--data-root", str(root), "--quiet", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("normscore-bench: error: 8 missing pieces; nothing was run:")
    assert "model weights (resnet50): the pretrained weights of timm model 'resnet50' are not on this machine" in err
    assert f"data imagenet:train: {root / 'train'} is empty" in err
    for split in ("val", "ssb_hard", "ninco", "inaturalist", "textures", "openimage_o"):
        assert f"data imagenet:{split}: not found" in err, split
    assert err.count("Expected layout under the data root") == 1
    # without a data root: the splits share one line
    monkeypatch.delenv("NORMSCORE_IMAGENET_ROOT", raising=False)
    assert main(["--model", "resnet50", "--id", "imagenet", "--quiet", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "2 missing pieces" in err
    assert "data imagenet:train, val, ssb_hard, ninco, inaturalist, textures, openimage_o: imagenet needs" in err
    # with the data in place only the weights are missing
    _fake_imagenet(str(tmp_path / "full"), per=1)
    args = ["--model", "resnet50", "--id", "imagenet", "--data-root", str(tmp_path / "full"), "--quiet", "--out", out]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 missing piece; nothing was run:\n  - model weights (resnet50)" in err and "data imagenet" not in err


def test_imagenet_suite_on_a_fake_tree_with_the_real_model(tmp_path):
    root = str(tmp_path / "imagenet")
    _fake_imagenet(root, per=3)
    out = tmp_path / "out"
    args = ["--id", "imagenet", "--data-root", root, "--detectors", "msp,energy", "--limit", "3", "--search"]
    args += [
        "--image-size",
        "96",
        "--val-size",
        "2",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--no-plots",
    ]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["model"]["name"] == "efficientnet_lite0" and r["model"]["weights"] == "pretrained"
    fmt = r["model"]["input_format"]
    assert (
        fmt["size"] == [96, 96]
        and fmt["crop_pct"] == 0.875
        and fmt["interpolation"] == "bicubic"
        and fmt["mean"] == [0.5, 0.5, 0.5]
    )
    groups = {o["label"]: o["group"] for o in r["ood"]}
    assert groups == {
        "ssb_hard": "near",
        "ninco": "near",
        "inaturalist": "far",
        "textures": "far",
        "openimage_o": "far",
    }
    assert r["validation"]["ood"] == {"dataset": "imagenet", "split": "openimage_o_val", "size": 2}
    assert r["splits"]["val-id"]["size"] == 2 and len(r["detectors"]["energy"]["search"]) == 5
    assert "OpenOOD" in r["validation"]["why"]


def test_imagefolder_id_trains_a_model_and_caches_it(tmp_path, capsys):
    root = tmp_path / "shapes"
    for split in ("train", "test"):
        for k, col in enumerate(((250, 20, 20), (20, 20, 250))):
            for i in range(12):
                _img(
                    str(root / split / f"c{k}" / f"{i}.png"), size=(20, 20), color=tuple(max(0, c - 5 * i) for c in col)
                )
    args = ["--id", f"imagefolder:{root}", "--ood", "noise", "--train-epochs", "1", "--image-size", "16"]
    args += ["--detectors", "msp", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 0
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["model"]["name"] == "smallcnn" and r["model"]["training"]["cached"] is False
    assert r["model"]["input_format"]["size"] == [16, 16] and r["id"]["num_classes"] == 2
    assert r["ood"] == [{"label": "noise", "dataset": "noise", "split": "test", "group": "other", "size": 2000}]
    assert main(args) == 0
    r2 = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r2["model"]["training"]["cached"] is True
    assert "noise" in capsys.readouterr().out


@pytest.mark.slow
def test_the_embedded_default_run(tmp_path, monkeypatch, capsys):
    """``normscore-bench`` without arguments, in a fresh cache (trains the model): minutes."""
    monkeypatch.setenv("NORMSCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    code = main([])
    cold = time.time() - t0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "normscore-results" / "fashion-mnist-smallcnn" / "results.json").read_text())
    assert r["id"]["accuracy"] > 0.85
    assert r["model"]["training"]["cached"] is False
    assert set(r["detectors"]) == set(r["registered_detectors"])
    assert code in (0, 1), out
    t0 = time.time()
    main([])
    warm = time.time() - t0
    r2 = json.loads((tmp_path / "normscore-results" / "fashion-mnist-smallcnn" / "results.json").read_text())
    assert r2["model"]["training"]["cached"] is True
    assert all(s["rows_extracted"] == 0 for s in r2["splits"].values())
    assert warm < cold
    assert os.path.isfile(tmp_path / "normscore-results" / "fashion-mnist-smallcnn" / "plots" / "summary_auroc.png")
