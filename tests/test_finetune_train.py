"""The training loop: mixed ID+OOD batches, long-tail subsets, resuming, BN conversion."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from helpers import TinyCNN
from torch import nn

from normscore.errors import ConfigError
from normscore.finetune import (
    FinetuneConfig,
    ProjectionHead,
    batchnorm_layers,
    class_prior,
    finetune,
    load_finetuned,
    long_tail_counts,
    long_tail_indices,
    long_tail_subset,
    make_bn_non_affine,
    method_loss,
    penultimate_with_grad,
    shot_accuracy,
    shot_groups,
)
from normscore.models import small_cnn


def _data(n=48, classes=4, size=12, chans=1, seed=0):
    """Learnable synthetic images: class k has a bright square at position k."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.2 * torch.rand(n, chans, size, size, generator=g)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, :, 2 + 5 * r : 5 + 5 * r, 2 + 5 * c : 5 + 5 * c] += 0.8
    return x, y


def _ood(n=32, size=12, chans=1, seed=1):
    return torch.rand(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


class DropNet(nn.Module):
    """BN + dropout, so resuming must restore the global random state as well."""

    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        return self.fc(self.drop(self.features(x)))


# ---------------------------------------------------------------------------------------------
# long tail


def test_long_tail_counts_match_the_profile():
    counts = long_tail_counts(6000, 10, 0.01)
    assert counts == [int(np.floor(6000 * 0.01 ** (c / 9) + 1e-9)) for c in range(10)]
    assert counts == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert long_tail_counts(500, 100, 0.01)[-1] == 5
    assert long_tail_counts(100, 5, 1.0) == [100] * 5
    with pytest.raises(ValueError):
        long_tail_counts(100, 5, 0.0)


def test_long_tail_indices_take_the_first_n_of_each_class():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(5), 40))
    idx, counts = long_tail_indices(labels, 0.1)
    assert counts == long_tail_counts(40, 5, 0.1) == [40, 22, 12, 7, 4]  # 40 * 0.1 ** 0.75 = 7.11
    assert np.bincount(labels[idx], minlength=5).tolist() == counts
    for c, n in enumerate(counts):
        assert idx[labels[idx] == c].tolist() == np.flatnonzero(labels == c)[:n].tolist()
    again, _ = long_tail_indices(labels, 0.1)
    assert np.array_equal(idx, again)  # deterministic
    with pytest.raises(ValueError, match="needs"):
        long_tail_indices(labels, 0.1, n_max=41)


def test_long_tail_subset_of_a_dataset():
    from normscore.data import ImageSet

    labels = np.repeat(np.arange(3), 10)
    ds = ImageSet(np.zeros((30, 4, 4), np.uint8), labels, "toy")
    sub, counts = long_tail_subset(ds, 0.2)
    assert counts == [10, 4, 2] and len(sub) == 16
    assert sorted(int(ds.labels[i]) for i in sub.indices).count(2) == 2


def test_shot_groups_and_accuracy():
    counts = long_tail_counts(6000, 10, 0.01)
    assert shot_groups(counts) == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    assert shot_groups([500] * 50 + [10] * 150) == {"many": list(range(50)), "medium": [], "few": list(range(50, 200))}
    labels = torch.arange(10).repeat_interleave(2)
    preds = labels.clone()
    preds[labels >= 7] = 0  # every few-shot sample wrong
    preds[0] = 1  # one of two class-0 samples wrong
    acc = shot_accuracy(preds, labels, counts)
    assert acc["few"] == 0.0 and acc["medium"] == 1.0
    assert acc["many"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert acc["overall"] == pytest.approx(13 / 20)


# ---------------------------------------------------------------------------------------------
# the mixed batch


def _cfg(method, **kw):
    base = {"epochs": 1, "batch_size": 16, "augment": False, "lr": 1e-3}
    base.update(kw)
    return FinetuneConfig.preset(method, **base)


def test_rna_step_updates_bn_statistics_with_the_ood_rows():
    x, y = _data(16)
    ood_a, ood_b = _ood(16, seed=1), _ood(16, seed=2) * 0.5 + 0.5
    torch.manual_seed(0)
    base = small_cnn(4, 1, 4)
    models = []
    for ood in (ood_a, ood_b):
        m = copy.deepcopy(base)
        finetune(m, (x, y), _cfg("rna"), aux_ood=ood, progress=False)  # exactly one step
        models.append(m)
    bn0 = next(b for _, b in batchnorm_layers(base))
    stats = [next(b for _, b in batchnorm_layers(m)) for m in models]
    assert not torch.allclose(stats[0].running_mean, stats[1].running_mean)
    # the running statistics are those of the *joint* ID+OOD batch (momentum 0.1)
    for m_stats, ood in zip(stats, (ood_a, ood_b)):
        with torch.no_grad():
            a = base.stem[0]((torch.cat([x, ood]) - 0.5) / 0.5)
        mean = a.mean((0, 2, 3))
        var = a.var((0, 2, 3), unbiased=True)
        assert torch.allclose(m_stats.running_mean, 0.9 * bn0.running_mean + 0.1 * mean, atol=1e-5)
        assert torch.allclose(m_stats.running_var, 0.9 * bn0.running_var + 0.1 * var, atol=1e-5)
    # plain LA-CE never sees OOD data: its statistics are those of the ID batch alone
    m = copy.deepcopy(base)
    finetune(m, (x, y), _cfg("la_ce"), progress=False)
    with torch.no_grad():
        a = base.stem[0]((x - 0.5) / 0.5)
    assert torch.allclose(batchnorm_layers(m)[0][1].running_mean, 0.1 * a.mean((0, 2, 3)), atol=1e-5)


def _mixed_grad(model, method, x, y, ood, train):
    cfg = _cfg(method, feature_loss_start_epoch=0)
    xo = ood.clone().requires_grad_(True)
    head = model.fc
    proj = ProjectionHead(head.in_features)
    model.train(train)
    with penultimate_with_grad(head) as store:
        logits = model(torch.cat([x, xo]))
        loss, terms = method_loss(
            cfg, logits, store["z"], y, prior=class_prior([4, 4, 4, 4]), projection=proj, head_weight=head.weight
        )
    assert not head._forward_pre_hooks
    (g,) = torch.autograd.grad(loss, xo)
    return g, terms


def test_rna_ood_rows_get_no_loss_term_only_bn_coupling():
    x, y = _data(16)
    ood = _ood(8)
    torch.manual_seed(0)
    model = small_cnn(4, 1, 4)
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 1, 12, 12))  # non-trivial running statistics
    # eval-mode BN: samples are independent, so any gradient on OOD inputs would be a loss term
    g_eval, terms = _mixed_grad(copy.deepcopy(model), "rna", x, y, ood, train=False)
    assert set(terms) == {"cls", "rna", "total"}
    assert torch.count_nonzero(g_eval) == 0
    # train mode (as in training): the OOD rows enter through the shared batch statistics only
    g_train, _ = _mixed_grad(copy.deepcopy(model), "rna", x, y, ood, train=True)
    assert g_train.abs().sum() > 0
    # control: methods with a loss on the OOD rows do give gradient in eval mode
    for method in ("la_ce_oe", "separation"):
        g, terms = _mixed_grad(copy.deepcopy(model), method, x, y, ood, train=False)
        assert g.abs().sum() > 0, method
        assert "oe" in terms


def test_separation_terms_switch_on_at_the_start_epoch():
    x, y = _data(32)
    torch.manual_seed(0)
    res = finetune(
        small_cnn(4, 1, 4), (x, y), _cfg("separation", epochs=4), aux_ood=_ood(64), progress=False
    )  # start epoch None -> 4 // 2 = 2
    assert [("sep" in h, "clu" in h) for h in res.history] == [(False, False)] * 2 + [(True, True)] * 2
    assert all("oe" in h for h in res.history)
    assert res.config.effective_ood_batch_size == 32  # PFS: twice the ID batch


# ---------------------------------------------------------------------------------------------
# end to end, resume, files


@pytest.mark.parametrize("method", ["ce", "la_ce", "ce_oe", "la_ce_oe", "rna", "separation"])
def test_tiny_training_run_improves_its_loss(method):
    x, y = _data(64)
    y_lt = y.clone()
    torch.manual_seed(0)
    model = small_cnn(4, 1, 4)
    cfg = _cfg(method, epochs=6, lr=5e-3, feature_loss_start_epoch=0, non_affine_bn=(method == "rna"))
    res = finetune(model, (x, y_lt), cfg, aux_ood=_ood(64), progress=False)
    first, last = res.history[0], res.history[-1]
    assert last["cls"] < first["cls"] - 0.1, res.history
    assert last["total"] < first["total"], res.history
    if method == "rna":
        assert last["rna"] < first["rna"]  # norms of g(z) grow
    assert not model.training
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.5


@pytest.mark.parametrize("method", ["rna", "separation"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, method):
    x, y = _data(48)
    ood = _ood(40)
    cfg = _cfg(method, epochs=3, checkpoint_every=2, augment=True, non_affine_bn=(method == "rna"))
    # 3 steps per epoch, 9 in total; checkpoints at steps 2, 3, 4, 6, 8, 9

    def run(out, kill_at=None):
        torch.manual_seed(0)
        model = DropNet()

        def cb(info):
            if kill_at is not None and info["step"] == kill_at:
                raise KeyboardInterrupt

        return finetune(model, (x, y), cfg, aux_ood=ood, out_dir=str(out), resume=True, callback=cb, progress=False)

    ref = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_at=5)  # mid-epoch, last checkpoint at step 4
    ck = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert ck["step"] == 4 and len(ck["history"]) == 1
    assert not (tmp_path / "b" / "model.pt").exists()
    torch.manual_seed(123)  # the caller's RNG state must not matter
    res = run(tmp_path / "b")
    assert res.steps == ref.steps == 9
    assert res.history == ref.history
    sa, sb = ref.model.state_dict(), res.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    if method == "rna":
        for (k, a), (_, b) in zip(ref.projection.state_dict().items(), res.projection.state_dict().items()):
            assert torch.equal(a, b), k
    # a finished run resumes to itself without training
    again = run(tmp_path / "b")
    assert again.steps == 9 and again.history == ref.history


def test_finetune_leaves_the_callers_rng_alone():
    x, y = _data(16)
    model = small_cnn(4, 1, 4)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    finetune(model, (x, y), _cfg("ce"), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_checkpoint_files_load_with_weights_only(tmp_path):
    x, y = _data(32)
    torch.manual_seed(0)
    model = small_cnn(4, 1, 4)
    res = finetune(
        model, (x, y), _cfg("rna", non_affine_bn=True), aux_ood=_ood(16), out_dir=str(tmp_path), progress=False
    )
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and ck["format"] == "normscore-finetune-checkpoint"
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["config"]["method"] == "rna" and meta["class_counts"] == [8, 8, 8, 8]
    assert meta["head"] == "fc" and meta["num_features"] == 16 and len(meta["bn_non_affine_layers"]) == 9
    assert set(torch.load(tmp_path / "projection.pt", weights_only=True)) == {
        "net.0.weight",
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
    }
    fresh = load_finetuned(small_cnn(4, 1, 4), str(tmp_path))
    assert torch.equal(fresh(x), res.model(x))
    # an existing run is not overwritten silently, and a changed config cannot resume it
    with pytest.raises(ConfigError, match="resume"):
        finetune(small_cnn(4, 1, 4), (x, y), _cfg("rna", non_affine_bn=True), aux_ood=_ood(16), out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="differs"):
        finetune(small_cnn(4, 1, 4), (x, y), _cfg("rna"), aux_ood=_ood(16), out_dir=str(tmp_path), resume=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="Did you mean 'rna'"):
        FinetuneConfig(method="rnaa")
    with pytest.raises(ConfigError, match="epochs"):
        FinetuneConfig(epochs=0)
    x, y = _data(16)
    with pytest.raises(ConfigError, match="aux_ood"):
        finetune(small_cnn(4, 1, 4), (x, y), _cfg("rna"), progress=False)
    with pytest.raises(ValueError, match="shape"):
        finetune(small_cnn(4, 1, 4), (x, y), _cfg("rna"), aux_ood=_ood(8, size=10), progress=False)
    cfg = FinetuneConfig.preset("separation", batch_size=64, epochs=3)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg and cfg.ood_batch_size == 128


# ---------------------------------------------------------------------------------------------
# non-affine batch norm, other architectures


def test_make_bn_non_affine_on_any_model():
    import timm

    m = timm.create_model("resnet18", num_classes=3)
    n_bn = len(batchnorm_layers(m))
    with pytest.warns(UserWarning, match="zero-initialises"):  # timm's zero-init last BN (gamma = 0)
        names = make_bn_non_affine(m, keep_affine=["*downsample.1"])
    kept = [n for n, _ in batchnorm_layers(m) if n.endswith("downsample.1")]
    assert len(names) == n_bn - len(kept) and len(kept) == 3
    for n, b in batchnorm_layers(m):
        if n in names:
            assert b.weight is None and b.bias is None and not b.affine
        else:
            assert b.weight is not None
    assert not any(k.endswith("bn1.weight") for k in m.state_dict())
    m.train()
    out = m(torch.rand(2, 3, 32, 32))
    out.sum().backward()  # still trainable
    # identity gamma/beta: the conversion keeps the function (eval mode)
    t = TinyCNN().eval()
    x = torch.rand(2, 3, 16, 16)
    before = t(x)
    make_bn_non_affine(t)
    assert torch.allclose(t(x), before, atol=1e-6)
    # trained gamma/beta: a warning says the function changes
    t2 = TinyCNN()
    with torch.no_grad():
        t2.features[1].weight.fill_(2.0)
    with pytest.warns(UserWarning, match="outputs change"):
        make_bn_non_affine(t2)
    assert make_bn_non_affine(t2) == []  # idempotent


@pytest.mark.parametrize("spec", ["resnet18", "tv:mobilenet_v3_small"])
@pytest.mark.parametrize("method", ["rna", "separation"])
def test_trains_timm_and_torchvision_models(spec, method):
    from normscore.finetune.cli import build_model

    x, y = _data(8, classes=3, size=32, chans=3)
    torch.manual_seed(0)
    model = build_model(spec, 3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(method, batch_size=8, ood_batch_size=4, feature_loss_start_epoch=0)
    res = finetune(model, (x, y), cfg, aux_ood=_ood(4, size=32, chans=3), progress=False)
    assert res.steps == 1 and set(res.history[0]) >= ({"rna"} if method == "rna" else {"sep", "clu", "oe"})
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0


def test_cli_train_resume_and_eval(tmp_path, capsys):
    pytest.importorskip("skimage")
    from normscore.finetune.cli import main

    if not os.path.exists("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Fashion-MNIST is not installed")
    run = str(tmp_path / "run")
    args = ["train", "--method", "rna", "--limit", "400", "--long-tail", "0.1", "--model", "smallcnn:4"]
    args += ["--epochs", "1", "--batch-size", "32", "--aux-n", "200", "--non-affine-bn", "--out", run, "--quiet"]
    assert main(args) == 0
    assert main(args) == 2  # exists and no --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert main(["eval", run, "--ood", "noise", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "penultimate_norm" in out and "many" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["ood"]) == {"penultimate_norm", "msp", "energy"}
    assert 0.0 <= rep["ood"]["penultimate_norm"]["noise"]["auroc"] <= 1.0
    assert main(["methods"]) == 0


def test_methods_table_names_its_terms():
    """METHODS maps a name to a frozen ``Method`` with named terms (not positional booleans),
    and a config reads each term by name."""
    import dataclasses

    from normscore.finetune.train import METHODS, FinetuneConfig, Method

    for name, m in METHODS.items():
        assert isinstance(m, Method)
        cfg = FinetuneConfig(method=name)
        got = (cfg.uses_la, cfg.uses_oe, cfg.uses_ood, cfg.uses_rna, cfg.uses_features)
        assert got == (m.logit_adjusted, m.outlier_exposure, m.ood_rows, m.rna, m.feature_terms)
        assert not m.outlier_exposure or m.ood_rows  # the OE term needs OOD rows
    assert METHODS["rna"].rna and not METHODS["ce"].rna
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["ce"].rna = True  # type: ignore[misc]
