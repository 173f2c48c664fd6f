"""Model adapters: head, penultimate, logits and blocks on timm and torchvision families."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import normscore
from normscore.adapters import Adapter
from normscore.errors import AdapterError
from normscore.taps import CaptureSpec, capture

# (source, name, constructor kwargs, input size, expected block layout)
ARCHS = [
    ("timm", "resnet18", {}, 64, "nchw"),
    ("timm", "resnext26ts", {}, 64, "nchw"),
    ("timm", "wide_resnet50_2", {}, 64, "nchw"),
    ("timm", "densenet121", {}, 64, "nchw"),
    ("timm", "vgg11", {}, 64, "nchw"),
    ("timm", "mobilenetv2_050", {}, 64, "nchw"),
    ("timm", "mobilenetv3_small_050", {}, 64, "nchw"),
    ("timm", "efficientnet_b0", {}, 64, "nchw"),
    ("timm", "tf_efficientnet_lite0", {}, 64, "nchw"),
    ("timm", "regnetx_002", {}, 64, "nchw"),
    ("timm", "convnext_atto", {}, 64, "nchw"),
    ("timm", "vit_tiny_patch16_224", {"img_size": 64}, 64, "tokens"),
    ("timm", "deit_tiny_patch16_224", {"img_size": 64}, 64, "tokens"),
    ("timm", "swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, 64, "nhwc"),
    ("timm", "mixer_s16_224", {"img_size": 64}, 64, "tokens"),
    ("timm", "inception_v3", {}, 96, "nchw"),
    ("tv", "resnet18", {}, 64, "nchw"),
    ("tv", "resnext50_32x4d", {}, 64, "nchw"),
    ("tv", "wide_resnet50_2", {}, 64, "nchw"),
    ("tv", "densenet121", {}, 64, "nchw"),
    ("tv", "vgg11_bn", {}, 64, "nchw"),
    ("tv", "mobilenet_v2", {}, 64, "nchw"),
    ("tv", "mobilenet_v3_small", {}, 64, "nchw"),
    ("tv", "efficientnet_b0", {}, 64, "nchw"),
    ("tv", "regnet_x_400mf", {}, 64, "nchw"),
    ("tv", "convnext_tiny", {}, 64, "nchw"),
    ("tv", "vit_b_16", {"image_size": 64}, 64, "tokens"),
    ("tv", "swin_t", {}, 64, "nhwc"),
    ("tv", "googlenet", {"aux_logits": False, "init_weights": True}, 64, "nchw"),
    ("tv", "inception_v3", {"aux_logits": False, "init_weights": True}, 96, "nchw"),
    ("tv", "shufflenet_v2_x0_5", {}, 64, "nchw"),
    ("tv", "mnasnet0_5", {}, 64, "nchw"),
    ("tv", "alexnet", {}, 64, "nchw"),
]


def build(src: str, name: str, kw: dict) -> nn.Module:
    torch.manual_seed(0)
    if src == "timm":
        return timm.create_model(name, num_classes=7, **kw).eval()
    return getattr(torchvision.models, name)(num_classes=7, **kw).eval()


@pytest.mark.parametrize("src,name,kw,size,layout", ARCHS, ids=[f"{a[0]}-{a[1]}" for a in ARCHS])
def test_head_reproduces_logits_and_blocks_resolve(src, name, kw, size, layout):
    model = build(src, name, kw)
    x = torch.randn(2, 3, size, size)
    a = Adapter(model)
    blocks_spec = frozenset((b, "featurenorm") for b in [])
    feats = capture(a, x, CaptureSpec(logits=True, penultimate=True, blocks=blocks_spec))
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(feats["logits"], ref, atol=1e-5)
    w, b = a.head_weight_bias()
    assert w.shape == (7, a.num_features) and b.shape == (7,)
    assert feats["penultimate"].shape == (2, a.num_features)
    assert (feats["penultimate"] @ w.T + b - feats["logits"]).abs().max() < 1e-4
    blocks = a.blocks
    assert len(blocks) >= 4, blocks
    assert {bl.layout for bl in blocks} == {layout}
    names = [bl.name for bl in blocks]
    assert len(set(names)) == len(names)
    # every block output can be captured and reduced in one pass
    spec = CaptureSpec(blocks=frozenset((n, "featurenorm") for n in names))
    f2 = capture(a, x, spec)
    for n in names:
        v = f2[f"block:{n}:featurenorm"]
        assert v.shape == (2,) and torch.isfinite(v).all() and (v >= 0).all()


def test_timm_penultimate_is_forward_head_pre_logits():
    model = build("timm", "convnext_atto", {})
    x = torch.randn(3, 3, 64, 64)
    feats = capture(Adapter(model), x, CaptureSpec(penultimate=True))
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(feats["penultimate"], ref, atol=1e-6)


def test_blocks_are_in_forward_order_with_expected_names():
    a = Adapter(build("timm", "resnet18", {}))
    a.ensure_resolved(torch.randn(1, 3, 32, 32))
    assert a.block_names == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    vit = Adapter(build("timm", "vit_tiny_patch16_224", {"img_size": 32}))
    vit.ensure_resolved(torch.randn(1, 3, 32, 32))
    assert vit.block_names == [f"blocks.{i}" for i in range(12)]
    assert all(b.prefix_tokens == 1 for b in vit.blocks)


def test_squeezenet_has_no_head_but_logit_detectors_work():
    model = torchvision.models.squeezenet1_0(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    det = normscore.create("energy").attach(model)
    assert det.score(x).shape == (2,)
    a = normscore.get_adapter(model)
    assert not a.has_head
    with pytest.raises(AdapterError, match="no linear head"):
        normscore.create("penultimate_norm").attach(model).score(x)


def test_squeezenet_at_small_input_is_still_headless():
    """At 32 px squeezenet's conv classifier outputs 1x1 maps; a ReLU then pooling follows, so
    the conv output is not the logits even when one probe sample happens to be positive."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(num_classes=5).eval()
    with torch.no_grad():
        model.classifier[1].bias.fill_(5.0)  # all-positive conv outputs: values equal after ReLU
    a = Adapter(model)
    a.ensure_resolved(torch.randn(1, 3, 32, 32))
    assert not a.has_head


def test_user_override_of_head_and_blocks():
    model = build("timm", "resnet18", {})
    a = Adapter(model, head="fc", blocks=["layer3", "layer4"])
    x = torch.randn(2, 3, 32, 32)
    a.ensure_resolved(x)
    assert a.head_name == "fc"
    assert a.block_names == ["layer3", "layer4"]
    with pytest.raises(AdapterError, match="Did you mean 'layer4'"):
        Adapter(model, blocks=["layer5"])
    with pytest.raises(AdapterError, match="not nn.Linear"):
        b = Adapter(model, head="layer4")
        b.ensure_resolved(x)


def test_wrong_user_head_is_rejected():
    model = torchvision.models.vgg11(num_classes=4).eval()
    a = Adapter(model, head="classifier.0")  # a Linear, but not the one producing logits
    with pytest.raises(AdapterError, match="not the model's logits"):
        a.ensure_resolved(torch.randn(1, 3, 32, 32))


def test_generic_fallback_finds_last_linear_of_custom_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU())
            self.proj = nn.Linear(6, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            h = self.body(x).mean((2, 3))
            return self.out(torch.relu(self.proj(h)))

    model = Net().eval()
    x = torch.randn(2, 3, 12, 12)
    a = Adapter(model)
    f = capture(a, x, CaptureSpec(penultimate=True))
    assert a.head_name == "out"
    assert a.block_names == ["body.1", "body.3"]
    w, b = a.head_weight_bias()
    assert torch.allclose(f["penultimate"] @ w.T + b, f["logits"], atol=1e-5)


def test_adapter_cache_and_describe(resnet):
    a = normscore.get_adapter(resnet)
    assert normscore.get_adapter(resnet) is a
    a.ensure_resolved(torch.randn(1, 3, 32, 32))
    d = a.describe()
    assert d["head"] == "fc" and d["num_classes"] == 10 and d["num_features"] == 512
    assert "fc" in repr(a)
    other = Adapter(resnet, blocks=["layer4"])
    normscore.set_adapter(resnet, other)
    assert normscore.get_adapter(resnet) is other
