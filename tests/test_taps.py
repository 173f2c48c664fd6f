"""Taps: per-call hooks, model hygiene, per-call storage across threads, backward captures."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import TinyCNN, assert_unchanged, snapshot
from torch import nn

import normscore
from normscore.adapters import Adapter
from normscore.errors import InputError, InputTypeError
from normscore.runmode import eval_mode
from normscore.taps import BackwardSpec, CaptureSpec, capture


def test_capture_leaves_model_unchanged_even_in_train_mode(tiny_model):
    tiny_model.train()
    tiny_model.features[1].eval()  # mixed flags must be restored exactly
    tiny_model.fc.weight.requires_grad_(False)
    snap = snapshot(tiny_model)
    a = Adapter(tiny_model)
    spec = CaptureSpec(penultimate=True, blocks=frozenset({("features.2", "featurenorm"), ("features.6", "raw")}))
    capture(a, torch.randn(8, 3, 16, 16), spec)
    assert_unchanged(tiny_model, snap)


def test_capture_runs_in_eval_mode(tiny_model):
    tiny_model.train()
    a = Adapter(tiny_model)
    x = torch.randn(4, 3, 16, 16)
    f = capture(a, x, CaptureSpec())
    tiny_model.eval()
    with torch.no_grad():
        ref = tiny_model(x)
    assert torch.equal(f["logits"], ref)


def test_hooks_removed_when_the_model_raises(tiny_model):
    class Boom(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:  # the probe passes, the capture fails mid-forward
                raise RuntimeError("boom")
            return self.inner(x)

    model = Boom(tiny_model)
    model.train()
    snap = snapshot(model)
    a = Adapter(model)
    with pytest.raises(InputError, match="boom"):
        capture(a, torch.randn(4, 3, 16, 16), CaptureSpec(penultimate=True))
    assert_unchanged(model, snap)


def test_eval_mode_is_reference_counted(tiny_model):
    tiny_model.train()
    with eval_mode(tiny_model):
        with eval_mode(tiny_model):
            assert not tiny_model.training
        assert not tiny_model.training
    assert tiny_model.training


def test_backward_capture_gives_exact_per_sample_gradients(tiny_model):
    snap = snapshot(tiny_model)
    a = Adapter(tiny_model)
    x = torch.randn(5, 3, 16, 16)

    def objective(z):
        return torch.logsumexp(z, dim=1)

    seen = {}

    def on_fc(module, inp, grad_out):
        # per-sample last-layer weight gradient, flattened: outer product of g and a
        seen["shape"] = tuple(inp.shape)
        return {"fc_grad": torch.einsum("bc,bd->bcd", grad_out, inp).flatten(1)}

    spec = CaptureSpec(backward=BackwardSpec(objective, layers={"fc": on_fc}, input_grad=True))
    f = capture(a, x, spec)
    assert_unchanged(tiny_model, snap)
    for i in range(5):
        xi = x[i : i + 1].clone().requires_grad_(True)
        out = objective(tiny_model(xi)).sum()
        gw, gx = torch.autograd.grad(out, [tiny_model.fc.weight, xi])
        assert torch.allclose(f["fc_grad"][i], gw.flatten(), atol=1e-6)
        assert torch.allclose(f["input_grad"][i], gx[0], atol=1e-6)
    assert seen["shape"] == (5, 16)


def test_backward_capture_with_inplace_relu_after_conv():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    a = Adapter(model, head="4")
    x = torch.randn(3, 3, 8, 8)
    got = {}

    def on_conv(module, inp, g):
        got["g"] = g.clone()
        return {}

    capture(a, x, CaptureSpec(backward=BackwardSpec(lambda z: z.logsumexp(1), layers={"0": on_conv})))
    # reference: gradient with respect to the conv output *before* the in-place ReLU
    conv_out = model[0](x).detach().requires_grad_(True)
    z = model[4](torch.relu(conv_out).mean((2, 3)))
    (ref,) = torch.autograd.grad(z.logsumexp(1).sum(), conv_out)
    assert torch.allclose(got["g"], ref, atol=1e-6)


def test_threads_get_their_own_tensors(resnet):
    det = normscore.create("penultimate_norm").attach(resnet)
    xs = [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    sequential = [det.score(x) for x in xs]
    results: dict[int, list] = {i: [] for i in range(4)}
    errors = []

    def work(tid):
        try:
            for _ in range(3):
                for j, x in enumerate(xs):
                    results[tid].append((j, det.score(x)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    snap = snapshot(resnet)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for tid in range(4):
        for j, s in results[tid]:
            assert torch.equal(s, sequential[j])
    assert_unchanged(resnet, snap)


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.randn(3, 16, 16), InputError, "unsqueeze"),
        (torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), InputTypeError, "floating-point"),
        (torch.full((2, 3, 16, 16), float("nan")), InputError, "NaN"),
        (torch.randn(2, 1, 16, 16), InputError, "channels"),
        ([[1.0]], InputTypeError, "torch.Tensor"),
        (torch.randn(0, 3, 16, 16), InputError, "empty"),
        (torch.randn(2, 3, 16, 16, device="meta"), InputError, "meta"),
    ],
    ids=["3d", "uint8", "nan", "channels", "list", "empty", "device"],
)
def test_bad_inputs_raise_clear_errors(tiny_model, x, exc, match):
    det = normscore.create("msp").attach(tiny_model)
    det.score(torch.randn(1, 3, 16, 16))  # resolve the adapter first
    with pytest.raises(exc, match=match):
        det.score(x)


def test_channel_error_on_first_call(tiny_model):
    with pytest.raises(InputError, match="channels"):
        normscore.create("msp").attach(tiny_model).score(torch.randn(2, 1, 16, 16))


def test_fixed_size_vit_gets_a_clear_error():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32).eval()
    with pytest.raises(InputError, match="input of shape"):
        normscore.create("msp").attach(vit).score(torch.randn(1, 3, 48, 48))


def test_half_precision_model_is_scored_in_its_dtype():
    torch.manual_seed(0)
    m = TinyCNN().eval()
    m16 = TinyCNN().eval()
    m16.load_state_dict(m.state_dict())
    m16 = m16.to(torch.bfloat16)
    x = torch.randn(4, 3, 16, 16)
    s = normscore.create("energy").attach(m16).score(x)
    ref = normscore.create("energy").attach(m).score(x)
    assert s.dtype == torch.float32
    assert torch.allclose(s, ref, atol=0.1)


def test_feature_keys_round_trip_through_taps():
    from normscore.taps import block_key, feature_kind, parse_key, view_key

    k = block_key("layer1.0", "gap")
    assert parse_key(k) == parse_key(k)  # frozen, comparable
    p = parse_key(view_key("jig", k))
    assert (p.view, p.base, p.block, p.reduction, p.kind) == ("jig", k, "layer1.0", "gap", "blocks")
    assert (parse_key("logits").view, parse_key("logits").kind) == (None, "logits")
    assert parse_key("input_grad").kind is None and feature_kind(view_key("v", "penultimate")) == "penultimate"


def test_block_reductions_register_like_views():
    from normscore.adapters import BlockInfo
    from normscore.taps import reduce_block, reduction_names, register_reduction

    info = BlockInfo(name="b", layout="nchw", prefix_tokens=0, shape=(2, 3, 3))
    t = torch.arange(36.0).reshape(2, 2, 3, 3)
    assert {"raw", "gap", "featurenorm"} <= set(reduction_names())  # featurenorm: by its detector
    register_reduction("max_test", lambda v: v.amax(dim=2))
    assert torch.equal(reduce_block(t, info, "max_test"), t.flatten(2).amax(dim=2))
    with pytest.raises(ValueError, match="unknown block reduction"):
        reduce_block(t, info, "nope")
    with pytest.raises(ValueError, match="invalid reduction name"):
        register_reduction("a:b", lambda v: v)
