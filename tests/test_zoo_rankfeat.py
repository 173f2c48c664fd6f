"""rankfeat: parity with pytorch-ood 0.4 ``RankFeat`` (one block) and a float64 reference of
OpenOOD's ``rankfeat_postprocessor.py`` (blocks 3 and 4 of a ResNet, logits averaged).

pytorch-ood: same TinyCNN, the backbone up to the last candidate block (``features.6``), the
rest as head, energy score; it returns ``-logsumexp`` (higher = OOD), ours ``logsumexp``.
OpenOOD: timm resnet18, numpy SVD of the stage-3 and stage-4 outputs, the network re-run by
hand from each modified map, ``T * logsumexp(mean logits / T)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from helpers import TinyCNN, assert_unchanged, snapshot
from scipy.stats import spearmanr

import normscore


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=5)
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 3, 16, 16))
    return m.eval()


def test_parity_with_pytorch_ood(tiny):
    from pytorch_ood.detector import RankFeat as PoodRankFeat

    x = torch.randn(60, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    det = normscore.create("rankfeat").attach(tiny)
    ours = det.score(x)
    assert det.blocks_used(det.adapter) == ["features.6"]
    ref = PoodRankFeat(backbone=tiny.features[0:7], head=torch.nn.Sequential(tiny.features[7:], tiny.fc))
    theirs = -ref.predict(x)
    assert spearmanr(ours.numpy(), theirs.numpy()).statistic >= 0.999
    assert torch.allclose(ours, theirs, atol=1e-5)


def _remove_rank1_np(t: torch.Tensor) -> torch.Tensor:
    a = t.double().numpy()
    b, c, h, w = a.shape
    m = a.reshape(b, c, h * w)
    out = np.empty_like(m)
    for i in range(b):
        u, s, vt = np.linalg.svd(m[i], full_matrices=False)
        out[i] = m[i] - s[0] * np.outer(u[:, 0], vt[0])
    return torch.from_numpy(out.reshape(b, c, h, w)).float()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_openood_variant_equals_a_float64_reference(temperature):
    torch.manual_seed(0)
    r = timm.create_model("resnet18", num_classes=6).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    det = normscore.create("rankfeat", variant="openood", temperature=temperature).attach(r)
    ours = det.score(x)
    assert det.blocks_used(det.adapter) == ["layer4.1", "layer3.1"]
    with torch.no_grad():
        f3 = r.layer3(r.layer2(r.layer1(r.maxpool(r.act1(r.bn1(r.conv1(x)))))))
        f4 = r.layer4(f3)
        z1 = r.fc(r.global_pool(_remove_rank1_np(f4))).double()
        z2 = r.fc(r.global_pool(r.layer4(_remove_rank1_np(f3)))).double()
    ref = temperature * torch.logsumexp((z1 + z2) / 2 / temperature, dim=1)
    assert torch.allclose(ours.double(), ref, atol=1e-4), (ours - ref).abs().max()


def test_cost_is_one_forward_per_modified_block_and_the_model_is_unchanged(tiny):
    calls = []
    h = tiny.fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        x = torch.randn(4, 3, 16, 16)
        snap = snapshot(tiny)
        normscore.create("rankfeat").attach(tiny).score(x)
        assert len(calls) == 1
        normscore.create("rankfeat", variant="openood").attach(tiny).score(x)
        assert len(calls) == 3
        assert_unchanged(tiny, snap)
    finally:
        h.remove()
    # a plain forward afterwards is the unmodified model
    with torch.no_grad():
        plain = tiny(x)
    assert torch.equal(normscore.capture(normscore.get_adapter(tiny), x, normscore.CaptureSpec())["logits"], plain)


def test_removal_changes_the_scores_and_bad_blocks_are_refused(tiny):
    x = torch.randn(5, 3, 16, 16)
    a = normscore.create("rankfeat").attach(tiny).score(x)
    with torch.no_grad():
        energy = torch.logsumexp(tiny(x), dim=1)
    assert not torch.allclose(a, energy)
    b = normscore.create("rankfeat", block="features.2").attach(tiny).score(x)
    assert not torch.allclose(a, b)
    with pytest.raises(normscore.errors.AdapterError, match="not a candidate block"):
        normscore.create("rankfeat", block="fc").attach(tiny).score(x)


def test_vit_tokens_keep_the_class_token():
    m = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32).eval()
    det = normscore.create("rankfeat", variant="openood").attach(m)
    s = det.score(torch.randn(3, 3, 32, 32))
    assert s.shape == (3,) and torch.isfinite(s).all()
    names = det.adapter.block_names
    assert det.blocks_used(det.adapter) == [names[-1], names[-2]]
