"""The scoring side of the fine-tuning module: the separation detector, the auxiliary OOD set
(disjoint from the test OOD sets) and the import isolation of ``normscore.finetune``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyCNN, assert_unchanged, snapshot

import normscore

ROOT = Path(__file__).resolve().parents[1]


def test_separation_detector_formula(tiny_model):
    det = normscore.create("separation").attach(tiny_model)
    x = torch.rand(6, 3, 16, 16)
    snap = snapshot(tiny_model)
    s = det.score(x)
    assert_unchanged(tiny_model, snap)
    with torch.no_grad():
        z = tiny_model.features(x)
        logits = tiny_model.fc(z)
    w = tiny_model.fc.weight.detach()
    expected = []
    for i in range(6):
        msp = max(torch.softmax(logits[i], 0).tolist())
        zn = z[i] / z[i].norm()
        cos = sum(abs(float(zn @ (w[c] / w[c].norm()))) for c in range(w.shape[0]))
        expected.append(msp + cos)
    assert torch.allclose(s, torch.tensor(expected), atol=1e-5)
    info = normscore.detector_info("separation")
    assert "2405.17816" in info["paper"] and "softmax" in info["formula"]
    assert info["needs_fit"] is False


def test_separation_detector_orthogonal_features_score_lower():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=2)
    with torch.no_grad():
        m.fc.weight.zero_()
        m.fc.weight[0, 0] = 1.0
        m.fc.weight[1, 1] = 1.0
        m.fc.bias.zero_()
    det = normscore.create("separation").attach(m.eval())
    feats = normscore.Features(
        logits=torch.zeros(2, 2),  # equal MSP (0.5) for both rows
        penultimate=torch.tensor([[1.0, 1.0] + [0.0] * 14, [0.0, 0.0, 1.0] + [0.0] * 13]),
    )
    det.adapter.ensure_resolved(torch.rand(1, 3, 16, 16))
    s = det.score_features(feats)
    assert s[0].item() == pytest.approx(0.5 + 2 / np.sqrt(2), abs=1e-6)
    assert s[1].item() == pytest.approx(0.5, abs=1e-6)  # orthogonal to every class weight


def test_separation_in_a_detector_set(tiny_model, loader):
    ds = normscore.DetectorSet(["separation", "msp"]).fit(tiny_model, loader)
    x = loader[0][0]
    out = ds.score(x)
    alone = normscore.create("separation").attach(tiny_model).score(x)
    assert torch.allclose(out["separation"], alone)
    assert (out["separation"] >= out["msp"] - 1e-6).all()


def test_scoring_path_does_not_import_finetune():
    code = (
        "import sys, torch, normscore\n"
        "from normscore.models import small_cnn\n"
        "m = small_cnn(10, 1, 4).eval()\n"
        "x = torch.rand(4, 1, 28, 28)\n"
        "names = normscore.list_detectors()\n"
        "assert 'separation' in names and 'penultimate_norm' in names, names\n"
        "for n in names:\n"
        "    d = normscore.create(n, **({'where': 'head'} if n == 'mcd' else {}))  # small_cnn has no dropout\n"
        "    if not d.needs_fit:\n"
        "        d.attach(m).score(x)\n"
        "bad = sorted(k for k in sys.modules if k.startswith('normscore.finetune'))\n"
        "assert not bad, bad\n"
        "print('ok', len(names))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")
    # and no module outside normscore/finetune imports it
    for p in (ROOT / "normscore").rglob("*.py"):
        if "finetune" in p.relative_to(ROOT / "normscore").parts:
            continue
        imports = re.findall(r"^\s*(?:from|import)\s.*$", p.read_text(), re.M)
        assert not [line for line in imports if "finetune" in line], p


# ---------------------------------------------------------------------------------------------
# the auxiliary OOD set


def _skimage_names_used_by_test_sets() -> set[str]:
    """scikit-image loaders referenced by normscore.data (every test OOD set lives there)."""
    from skimage import data as skdata

    loaders = {n for n in dir(skdata) if not n.startswith("_") and callable(getattr(skdata, n))}
    used: set[str] = set()
    for p in (ROOT / "normscore" / "data").rglob("*.py"):
        src = p.read_text()
        words = set(re.findall(r"[\"']([a-z_]+)[\"']", src))
        words |= set(re.findall(r"skimage:([a-z_]+)", src)) | set(re.findall(r"\bdata\.([a-z_]+)\(", src))
        used |= words & loaders
    return used


def test_aux_ood_sources_are_disjoint_from_the_test_ood_sets():
    pytest.importorskip("skimage")
    from normscore.finetune.aux_ood import AUX_SOURCES, TEST_OOD_SKIMAGE_IMAGES

    used = _skimage_names_used_by_test_sets()
    assert {"brick", "astronaut"} <= used  # the scan does find the test sets' images
    assert not used & set(AUX_SOURCES), used & set(AUX_SOURCES)
    assert not set(TEST_OOD_SKIMAGE_IMAGES) & set(AUX_SOURCES)


def test_aux_ood_images_are_deterministic_and_varied():
    pytest.importorskip("skimage")
    from normscore.finetune import aux_ood_dataset, aux_ood_images

    a = aux_ood_images(300, 28, seed=3)
    b = aux_ood_images.__wrapped__(300, 28, seed=3)  # bypass the cache: really recomputed
    assert np.array_equal(a, b) and a.shape == (300, 28, 28, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, aux_ood_images(300, 28, seed=4))
    assert a.reshape(300, -1).std(1).min() > 1.0  # near-constant crops are redrawn
    assert len({x.tobytes() for x in a}) == 300
    ds = aux_ood_dataset(300, channels=1, image_size=28, seed=3)
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and 0.0 <= x.min() and x.max() <= 1.0 and int(y) == -1
    assert aux_ood_dataset(50, channels=3, image_size=32)[0][0].shape == (3, 32, 32)
