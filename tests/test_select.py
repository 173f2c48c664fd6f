"""normscore.select: ranking detectors without OOD data (issue 15, item 3). Deterministic, a
function of the ID loader only, pseudo-OOD of the ID shape that differs from ID, a clear-signal
case ranked right, the refit options, clear errors, and ``--search --val-ood pseudo`` in the bench."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TinyCNN, make_loader
from torch import nn

import normscore
from normscore.errors import ConfigError, InputError, InputTypeError
from normscore.select import DEFAULT_KINDS, PSEUDO_OOD, heldout_mask, pseudo_ood, select


def smooth_images(n: int, size: int = 16, seed: int = 0, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth ID images: class-dependent 4x4 patterns (plus a little noise) upsampled bilinearly."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, 3, 4, 4, generator=g)
    y = torch.arange(n) % classes
    low = protos[y] + 0.5 * torch.randn(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)
    return x, y


def loader_of(x: torch.Tensor, y: torch.Tensor, batch: int = 32) -> list:
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


class Smoothness(nn.Module):
    """Penultimate features that see texture: mean absolute horizontal / vertical differences and
    the mean of each channel; a random linear head on top (so logit scores see little)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(9, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=(2, 3))
        dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(2, 3))
        return torch.cat([dx, dy, x.mean(dim=(2, 3))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = TinyCNN(num_classes=5).eval()
    return m, make_loader(n=160, batch=32, size=16, classes=5)


CANDS = ["msp", "energy", ("knn", {"k": 5}), ("knn", {"k": 1}), "mahalanobis"]


# ---------------------------------------------------------------------------------------------
# the pseudo-OOD images


@pytest.mark.parametrize("kind", list(PSEUDO_OOD))
def test_each_kind_has_the_id_shape_differs_from_id_and_is_per_sample(kind):
    x, _ = smooth_images(12)
    idx = torch.arange(100, 112)
    before = x.clone()
    out = pseudo_ood(kind, x, idx, seed=3)
    assert torch.equal(x, before)  # the input is not modified
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all()
    for i in range(len(x)):  # every image changed
        assert not torch.allclose(out[i], x[i], atol=1e-4), (kind, i)
    assert torch.equal(pseudo_ood(kind, x, idx, seed=3), out)  # deterministic
    if kind != "mix":  # a function of each image and its position only (mix: of its partner too)
        perm = torch.tensor([5, 2, 11, 0, 7, 1, 3, 10, 4, 9, 6, 8])
        assert torch.equal(pseudo_ood(kind, x[perm], idx[perm], seed=3), out[perm])
        assert torch.equal(pseudo_ood(kind, x[3:5], idx[3:5], seed=3), out[3:5])
    else:
        partner = torch.flip(x, dims=(0,))
        assert torch.equal(pseudo_ood(kind, x, idx, partner=partner), 0.5 * x + 0.5 * partner)


def test_kinds_use_no_global_randomness_and_the_seed_matters():
    x, _ = smooth_images(8)
    idx = torch.arange(8)
    state = torch.get_rng_state()
    for kind in ("jigsaw", "permute", "noise", "corrupt"):
        a = pseudo_ood(kind, x, idx, seed=0)
        assert not torch.equal(a, pseudo_ood(kind, x, idx, seed=1)), kind
    assert torch.equal(torch.get_rng_state(), state)


def test_named_corruptions_keep_what_they_say():
    x, _ = smooth_images(4)
    p = pseudo_ood("permute", x)
    assert torch.equal(torch.sort(p.flatten(2), dim=2).values, torch.sort(x.flatten(2), dim=2).values)  # histogram
    n = pseudo_ood("noise", x)
    assert torch.allclose(n.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.35)
    c = pseudo_ood("contrast", x)
    assert (c >= x.amin(dim=(2, 3), keepdim=True) - 1e-6).all() and (c <= x.amax(dim=(2, 3), keepdim=True) + 1e-6).all()
    b = pseudo_ood("blur", x)
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert tv(b) < 0.6 * tv(x)


def test_heldout_split_is_a_hash_of_the_position():
    idx = torch.arange(20000)
    m = heldout_mask(idx, 0.2, seed=0)
    assert abs(float(m.float().mean()) - 0.2) < 0.01
    assert torch.equal(heldout_mask(idx[777:1234], 0.2, seed=0), m[777:1234])  # batch independent
    assert not torch.equal(heldout_mask(idx, 0.2, seed=1), m)


def test_pseudo_ood_errors():
    with pytest.raises(ConfigError, match="unknown pseudo-OOD kind"):
        pseudo_ood("fog", torch.zeros(2, 3, 8, 8))
    with pytest.raises(InputError, match=r"\[B, C, H, W\]"):
        pseudo_ood("noise", torch.zeros(2, 8))


# ---------------------------------------------------------------------------------------------
# select


def test_select_is_deterministic_bitwise(tiny):
    m, loader = tiny
    a = select(m, loader, CANDS, refit=False)
    b = select(m, loader, CANDS, refit=False)
    assert [c.to_dict() for c in a.ranking] == [c.to_dict() for c in b.ranking]
    x = loader[0][0]
    assert torch.equal(a.best_.score(x), b.best_.score(x))
    assert a.best_.decision.threshold == b.best_.decision.threshold
    assert json.dumps(a.evidence, sort_keys=True) == json.dumps(b.evidence, sort_keys=True)


def test_select_sees_only_the_id_loader_and_its_pseudo_ood(tiny, monkeypatch):
    """The scored sets are the held-out ID images and pseudo_ood() of them: every image the model
    sees during the selection is an ID image or a pseudo-OOD copy of one (recomputed here)."""
    m, loader = tiny
    xs = torch.cat([b[0] for b in loader])
    held = heldout_mask(torch.arange(len(xs)), 0.2, seed=0)
    xh, ih = xs[held], torch.arange(len(xs))[held]
    partner = torch.cat([torch.rot90(xh[:1], 2, dims=(2, 3)), xh[:-1]])
    allowed = [xs] + [pseudo_ood(k, xh, ih, seed=0, partner=partner) for k in DEFAULT_KINDS]
    allowed_rows = {tuple(r.flatten().tolist()) for t in allowed for r in t}
    seen: list[torch.Tensor] = []
    orig = normscore.select.__globals__["capture"]

    def spy(adapter, x, spec, **kw):
        seen.append(x.detach().cpu())
        return orig(adapter, x, spec, **kw)

    monkeypatch.setitem(normscore.select.__globals__, "capture", spy)
    sel = select(m, loader, ["msp", ("knn", {"k": 5})], refit=None)
    assert seen and sel.n_heldout == int(held.sum()) and sel.n_fit == len(xs) - int(held.sum())
    rows = torch.cat(seen)
    assert all(tuple(r.flatten().tolist()) in allowed_rows for r in rows)
    # every pseudo-OOD image of every kind was scored
    assert len(rows) == sel.n_fit + sel.n_heldout * (1 + len(DEFAULT_KINDS))


@pytest.mark.filterwarnings("ignore::normscore.errors.CalibrationWarning")
def test_a_clear_signal_is_ranked_right():
    """Features that measure texture separate smooth ID images from jigsaw seams, permuted pixels,
    noise and contrast (Mahalanobis on them: ~97% mean AUROC); a random head's softmax and max
    logit see almost nothing of it (< 50%). Every Mahalanobis configuration ranks above both."""
    torch.manual_seed(0)
    m = Smoothness().eval()
    x, y = smooth_images(400)
    sel = select(m, loader_of(x, y), ["msp", "maxlogit", "mahalanobis"], refit=True)
    n_maha = len(normscore.detector_info("mahalanobis")["search_space"]["shrinkage"])
    assert [c.name for c in sel.ranking[:n_maha]] == ["mahalanobis"] * n_maha, sel.table()
    top = sel.detectors()
    assert top[0].mean_auroc > 0.9 and max(c.mean_auroc for c in top[1:]) < 0.6, sel.table()
    assert sel.best_.is_fitted and sel.best_.n_fit_samples_ == 400  # refit on all ID data
    assert sel.best_.name == "mahalanobis" and sel.best_.get_params() == {**sel.best_.get_params(), **sel.best.params}


def test_search_spaces_are_ranked_and_refit_false_keeps_the_fit_part_detector(tiny):
    m, loader = tiny
    sel = select(m, loader, ["energy"], pseudo_ood=["noise", "jigsaw"], refit=False)
    space = normscore.detector_info("energy")["search_space"]["temperature"]
    assert sorted(c.params["temperature"] for c in sel.ranking) == sorted(space)
    assert [c.rank for c in sel.ranking] == list(range(1, len(space) + 1))
    keys = [c.key() for c in sel.ranking]
    assert keys == sorted(keys)
    assert sel.best_params("energy") == sel.best.params
    assert sel.best_.decision.n == sel.n_heldout  # threshold from the held-out ID scores
    assert set(sel.best.auroc) == {"noise", "jigsaw"}
    assert "mean AUROC" in sel.table() and "energy" in repr(sel)
    plain = select(m, loader, ["energy"], search=False, refit=None)
    assert len(plain.ranking) == 1 and plain.best_ is None


def test_failures_rank_last_with_their_error_and_model_route_detectors_run(tiny):
    m, loader = tiny
    sel = select(m, loader, [("knn", {"k": 1000}), "msp", ("odin", {"noise": 0.001})], refit=None)
    last = sel.ranking[-1]
    assert last.name == "knn" and last.error and "k=1000" in last.error
    odin = sel.for_detector("odin")[0]
    assert odin.mode == "model" and odin.error is None and 0.0 <= odin.mean_auroc <= 1.0


def test_select_errors(tiny):
    m, loader = tiny
    with pytest.raises(ConfigError, match="unknown pseudo-OOD kind"):
        select(m, loader, ["msp"], pseudo_ood=["fog"])
    with pytest.raises(ConfigError, match="name or a"):
        select(m, loader, [42])
    with pytest.raises(ConfigError, match="unknown detector"):
        select(m, loader, ["mps"])
    with pytest.raises(InputTypeError, match="re-iterable"):
        select(m, iter(loader), ["msp"])
    with pytest.raises(ConfigError, match="holdout"):
        select(m, loader, ["msp"], holdout=1.0)
    with pytest.raises(ConfigError, match="no candidate could be fitted"):
        select(m, loader, [("knn", {"k": 1000})])


def test_select_leaves_the_model_alone(tiny):
    from helpers import assert_unchanged, snapshot

    m, loader = tiny
    m.train()
    try:
        snap = snapshot(m)
        select(m, loader, ["msp", ("knn", {"k": 5})], pseudo_ood=["mix"], refit=None)
        assert_unchanged(m, snap)
    finally:
        m.eval()


# ---------------------------------------------------------------------------------------------
# the bench: --search --val-ood pseudo


def test_bench_search_with_pseudo_ood_runs_end_to_end(tmp_path, capsys):
    from bench_helpers import save_checkpoint

    from normscore.bench.cli import main

    ckpt = save_checkpoint(str(tmp_path / "smallcnn.pt"))
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--limit", "48", "--detectors", "msp,energy,knn", "--search", "--val-ood"]
    args += ["pseudo", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--no-plots"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "pseudo" in text
    r = json.loads((out / "results.json").read_text())
    sel = r["selection"]["cached"]
    assert sel["split"] == "fit" and set(sel["kinds"]) == set(DEFAULT_KINDS)
    assert sel["n_fit"] + sel["n_heldout"] == r["id"]["fit_size"] == 48
    rows = sel["rows"]
    assert {x["name"] for x in rows} == {"msp", "energy", "knn"} and rows[0]["rank"] == 1
    energy = r["detectors"]["energy"]
    assert len(energy["search"]) == len(normscore.detector_info("energy")["search_space"]["temperature"])
    best = min((x for x in rows if x["name"] == "energy"), key=lambda x: x["rank"])
    assert energy["params"]["temperature"] == best["params"]["temperature"]
    assert r["validation"]["ood"]["dataset"] == "pseudo" and r["config"]["val_ood"] == "pseudo"
    assert not any(k.startswith("val") for k in r["splits"])  # no validation OOD set was read
    assert r["detectors"]["knn"]["error"] is None
