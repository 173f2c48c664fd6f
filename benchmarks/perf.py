"""Speed and scale, measured as ratios side by side in one run (the machines are noisy).

Each measurement prints one JSON line ``{"name", "ours_s", "ref_s", "ratio", "params", ...}``
where ``ratio = ours_s / ref_s`` (below 1 = ours faster; for "x faster" read 1/ratio).
Timings are medians of interleaved repeats (ours, ref, ours, ref, ...).

    python benchmarks/perf.py --quick            # < ~3 minutes on 2 cores
    python benchmarks/perf.py --json perf.jsonl  # the full set, also written to a file
    python benchmarks/perf.py --only hooks,zoo   # a subset

Sections: ``hooks`` (hook overhead), ``oneset`` (all forward-only detectors from one pass),
``extra`` (each detector with input gradients or extra passes, as a multiple of one forward),
``gradunc`` (grad_uncertainty's batched per-sample gradients vs one backward per sample),
``features`` (scoring on identical features vs pytorch-ood 0.4), ``gradnorm``, ``ldg``,
``memory`` (fit peak RSS vs N), ``dist`` (torchrun fit == single-process fit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import normscore
from normscore.taps import Features

HERE = Path(__file__).resolve().parent
OUT: list[dict] = []
JSON_PATH: str | None = None


def emit(name: str, ours: float, ref: float, params: dict, **extra: object) -> None:
    row = {
        "name": name,
        "ours_s": round(ours, 6),
        "ref_s": round(ref, 6),
        "ratio": round(ours / ref, 4),
        "params": params,
    }
    row.update(extra)
    OUT.append(row)
    print(json.dumps(row), flush=True)
    if JSON_PATH:
        with open(JSON_PATH, "a") as f:
            f.write(json.dumps(row) + "\n")


def timed(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, interleaving the functions in every round."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()).statistic)


class FeatureModel(nn.Module):
    """A linear head on 'feature images' ``[B, D, 1, 1]``: penultimate = input, logits = W h + b.

    Lets every detector run on given features through the normal model interface.
    """

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(x))


def synthetic_features(
    n: int, c: int, d: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-structured non-negative features (like post-ReLU pooled features) and a head."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g).abs() * 0.5
    y = torch.arange(n) % c
    h = (means[y] + 0.3 * torch.randn(n, d, generator=g)).clamp_min(0)
    w = torch.randn(c, d, generator=g) / d**0.5
    b = torch.randn(c, generator=g) * 0.1
    return h, y, w, b


def feats_of(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, y: torch.Tensor | None = None) -> Features:
    f = Features(penultimate=h, logits=h @ w.T + b)
    if y is not None:
        f["labels"] = y
    return f


# ---------------------------------------------------------------------------------------------
# 1. hook overhead


def bench_hooks(quick: bool) -> None:
    import timm

    repeat = 2 if quick else 7
    for arch in ("resnet50", "vit_small_patch16_224"):
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False).eval()
        bsz = 8 if quick else 16  # --quick: a smoke run; the table in docs/ uses batch 16
        x = torch.randn(bsz, 3, 224, 224)
        fit = [torch.randn(8, 3, 224, 224) for _ in range(2)]
        adapter = normscore.get_adapter(model)
        adapter.ensure_resolved(x[:1])
        blocks = adapter.block_names
        for name in ("penultimate_norm", "energy", "featurenorm"):
            hp = {"block": blocks[len(blocks) * 3 // 4]} if name == "featurenorm" else {}
            det = normscore.create(name, **hp).fit(model, fit)

            def plain(model=model, x=x):
                with torch.no_grad():
                    model(x)

            t = timed({"ours": lambda: det.score(x), "ref": plain}, repeat)
            emit(f"hook_overhead/{name}/{arch}", t["ours"], t["ref"], {"batch": bsz, "px": 224, "target": "<= 1.05"})
            if name == "energy":  # the pipeline path: logits and scores from one pass
                hooked = normscore.ScoringModule(model, det)
                graph = normscore.ScoringModule(model, det, hook_free=True, example_input=x[:1])

                def run(m):
                    with torch.no_grad():
                        m(x)

                t = timed({"hooks": lambda: run(hooked), "graph": lambda: run(graph), "ref": plain}, repeat)
                for kind in ("hooks", "graph"):
                    emit(
                        f"scoring_module/{kind}/{name}/{arch}",
                        t[kind],
                        t["ref"],
                        {"batch": bsz, "px": 224, "target": "<= 1.05", "returns": "(logits, scores)"},
                    )


# ---------------------------------------------------------------------------------------------
# 2. all forward-only detectors from one pass


def forward_only_detectors() -> list[str]:
    out = []
    for n in normscore.list_detectors():
        c = normscore.detector_class(n)
        if not c.needs_gradients and c.feature_only:
            out.append(n)
    return out


def bench_oneset(quick: bool) -> None:
    import timm

    repeat = 3 if quick else 5
    names = forward_only_detectors()
    # small-fit settings (64 fit images), and gmm's tied-covariance variant: one 2048 x 2048
    # covariance per class (the default, pytorch-ood's) needs 31 GiB at 1000 classes and refuses
    small = {"knn": {"k": 5}, "nnguide": {"k": 5, "alpha": 1.0}, "gmm": {"variant": "openood", "n_components": 10}}
    for px in (224, 32):
        torch.manual_seed(0)
        model = timm.create_model("resnet50", pretrained=False).eval()
        g = torch.Generator().manual_seed(1)
        xs = [torch.randn(16, 3, px, px, generator=g) for _ in range(4)]
        with torch.no_grad():  # labelled with the model's own predictions: every fit sample is
            fit = [(x_, model(x_).argmax(1)) for x_ in xs]  # "correctly classified" (she, grood, ...)
        ds = normscore.DetectorSet([normscore.create(n, **small.get(n, {})) for n in names]).fit(model, fit)
        # the banks a fit on 50,000 ID images gives at the detectors' defaults: knn keeps all
        # of them (alpha = 1), nnguide 1% (alpha = 0.01, its paper's setting)
        bank = torch.randn(50_000, 2048, generator=g).abs()
        bank = bank / bank.norm(dim=1, keepdim=True)
        for key, det in ds.detectors.items():
            if det.name == "knn":
                det.bank_ = bank.clone()
                det.set_params(k=50)
            if det.name == "nnguide":
                det.bank_ = bank[:500] * (torch.rand(500, 1, generator=g) + 5.0)
                det.set_params(k=100)
        for batch in (16, 64) if px == 224 else (16,):
            x = torch.randn(batch, 3, px, px)
            ds.score(x)  # build indices

            def plain(x=x):
                with torch.no_grad():
                    model(x)

            t = timed({"ours": lambda x=x: ds.score(x), "ref": plain}, repeat)
            # where the time goes: the shared capture, then each detector on the captured features
            adapter = next(iter(ds.detectors.values())).adapter
            spec = None
            for det in ds.detectors.values():
                sp = det.capture_spec(adapter, "score")
                spec = sp if spec is None else spec | sp
            feats = normscore.capture(adapter, x, spec)
            t_cap = timed({"c": lambda x=x: normscore.capture(adapter, x, spec)}, repeat)["c"]
            own = {
                det.name: timed({"s": lambda det=det: det.score_features(feats)}, 2)["s"]
                for det in ds.detectors.values()
            }
            slowest = sorted(own.items(), key=lambda kv: -kv[1])[:3]
            emit(
                f"one_pass_all_forward_detectors/resnet50/{px}px/batch{batch}",
                t["ours"],
                t["ref"],
                {
                    "batch": batch,
                    "px": px,
                    "n_detectors": len(names),
                    "knn_bank": 50_000,
                    "nnguide_bank": 500,
                    "target": "<= 1.2 (224px)",
                },
                capture_ratio=round(t_cap / t["ref"], 4),
                slowest_detectors_s={k: round(v, 4) for k, v in slowest},
                detectors=names,
            )


def extra_pass_detectors() -> list[str]:
    """Detectors that need more than the shared forward pass: input gradients or extra passes."""
    return [n for n in normscore.list_detectors() if n not in forward_only_detectors()]


#: small-fit settings for the extra-pass detectors fitted on a few images (defaults elsewhere)
_EXTRA_SMALL = {
    "ldg": {"n_components": 4, "params": "head"},
    "adascale": {"num_samples": 32},
    "mcd": {"where": "head"},  # timm applies drop_rate functionally: no nn.Dropout module to hook
}


def bench_extra(quick: bool) -> None:
    """Cost over one plain forward of each detector that needs input gradients or extra passes
    (ODIN, Mahalanobis+ODIN, AdaSCALE, MC dropout, RankFeat, LDG, ...), at 224 px on resnet50
    (``mcd`` with OpenOOD-style dropout on the penultimate features: resnet50 has no dropout)."""
    import timm

    repeat = 2 if quick else 3
    g = torch.Generator().manual_seed(1)
    fit = [(torch.randn(8, 3, 224, 224, generator=g), torch.randint(0, 1000, (8,), generator=g)) for _ in range(4)]
    x = torch.randn(8, 3, 224, 224, generator=g)
    for name in extra_pass_detectors():
        torch.manual_seed(0)
        model = timm.create_model("resnet50", pretrained=False).eval()
        try:
            det = normscore.create(name, **_EXTRA_SMALL.get(name, {})).fit(model, fit)
        except Exception as e:  # noqa: BLE001 - reported, the other detectors still run
            print(json.dumps({"name": f"extra_pass/{name}", "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
            continue

        def plain(model=model):
            with torch.no_grad():
                model(x)

        t = timed({"ours": lambda det=det: det.score(x), "ref": plain}, repeat)
        emit(
            f"extra_pass/{name}/resnet50/224px",
            t["ours"],
            t["ref"],
            {"batch": 8, "px": 224, "ref": "one plain forward", "needs_gradients": det.needs_gradients},
        )


def bench_gradunc(quick: bool) -> None:
    """grad_uncertainty ``params="all"``: one batched backward through the per-sample gradient
    engine vs one backward pass per sample, on two models either side of
    ``grad_uncertainty.BATCHED_MAX_PARAMS`` (the detector picks the faster path by model size)."""
    import timm

    from normscore.detectors.engines.layers import resolve_layers
    from normscore.models import small_cnn

    torch.manual_seed(0)
    cases = [
        ("smallcnn16/28px", small_cnn(width=16).eval(), torch.randn(256, 1, 28, 28)),
        ("resnet18/64px", timm.create_model("resnet18", num_classes=10).eval(), torch.randn(32, 3, 64, 64)),
    ]
    for tag, model, x in cases:
        det = normscore.create("grad_uncertainty").attach(model)
        det.adapter.ensure_resolved(x)
        params = [p for p in model.parameters() if p.requires_grad]
        slots = resolve_layers(det.adapter, "all", x[:1]).slots
        t = timed(
            {
                "ours": lambda det=det, x=x, s=slots: det._all_batched(x, s),
                "ref": lambda det=det, x=x, p=params: det._all_per_sample(x, p),
            },
            2,
        )
        a, b = det._all_batched(x, slots), det._all_per_sample(x, params)
        emit(
            f"grad_uncertainty/batched_vs_per_sample/{tag}",
            t["ours"],
            t["ref"],
            {"batch": x.shape[0], "ref": "one backward pass per sample"},
            max_rel_diff=float(((a - b).abs() / b.abs()).max()),
        )


# ---------------------------------------------------------------------------------------------
# 3. scoring on identical features vs pytorch-ood 0.4


def _pood():
    try:
        import pytorch_ood.detector as pd
    except ImportError:
        print(json.dumps({"name": "pytorch-ood", "skipped": "pip install pytorch-ood==0.4.0 (bench extra)"}))
        return None
    return pd


def _ours_on_features(name: str, fit: Features, model: nn.Module, **hp: object) -> normscore.Detector:
    det = normscore.create(name, **hp).attach(model)
    n = fit.batch_size
    batches = [fit.select(slice(i, i + 4096)) for i in range(0, n, 4096)]
    return det.fit_features(batches, calibration=0.0)


def bench_features(quick: bool) -> None:
    pd = _pood()
    if pd is None:
        return
    repeat = 2 if quick else 3
    # Mahalanobis / RMDS at C = 1000, D = 2048
    c, d = 1000, 2048
    n = 10 * c if quick else 20 * c
    bq = 16 if quick else 64
    h, y, w, b = synthetic_features(n, c, d)
    q, _, _, _ = synthetic_features(bq, c, d, seed=1)
    model = FeatureModel(w, b).eval()
    normscore.get_adapter(model).ensure_resolved(h[:1, :, None, None])
    fit, qf = feats_of(h, w, b, y), feats_of(q, w, b)
    for name, ref_cls in (("mahalanobis", pd.Mahalanobis), ("rmds", pd.RMD)):
        ours = _ours_on_features(name, fit, model)
        ref = ref_cls(None).fit_features(h, y)
        t = timed({"ours": lambda: ours.score_features(qf), "ref": lambda: ref.predict_features(q)}, repeat)
        rho = spearman(ours.score_features(qf), -ref.predict_features(q))
        emit(
            f"features/{name}",
            t["ours"],
            t["ref"],
            {"C": c, "D": d, "N_fit": n, "B": bq, "target": ">= 50x faster"},
            spearman=round(rho, 6),
        )

    # KNN with a 100k bank (faiss flat vs scikit-learn NearestNeighbors)
    nb = 100_000
    hb, yb, wb, bb = synthetic_features(nb, 100, 512, seed=2)
    qk, _, _, _ = synthetic_features(256, 100, 512, seed=3)
    model_k = FeatureModel(wb, bb).eval()
    normscore.get_adapter(model_k).ensure_resolved(hb[:1, :, None, None])
    ours = _ours_on_features("knn", feats_of(hb, wb, bb, yb), model_k, k=50)
    ref = pd.KNN(None, k=50).fit_features(hb, yb)
    qkf = feats_of(qk, wb, bb)
    t = timed({"ours": lambda: ours.score_features(qkf), "ref": lambda: ref.predict_features(qk)}, repeat)
    emit(
        "features/knn",
        t["ours"],
        t["ref"],
        {"bank": nb, "D": 512, "B": 256, "k": 50},
        spearman=round(spearman(ours.score_features(qkf), -ref.predict_features(qk)), 6),
    )

    # ViM and DICE at C = 1000, D = 2048
    ours = _ours_on_features("vim", fit, model, dim=512)
    ref = pd.ViM(None, d=512, w=w, b=b).fit_features(h, y)
    t = timed({"ours": lambda: ours.score_features(qf), "ref": lambda: ref.predict_features(q)}, repeat)
    emit(
        "features/vim",
        t["ours"],
        t["ref"],
        {"C": c, "D": d, "dim": 512, "B": bq},
        spearman=round(spearman(ours.score_features(qf), -ref.predict_features(q)), 6),
    )
    ours = _ours_on_features("dice", fit, model, percentile=90)
    ref = pd.DICE(None, w=w, b=b, p=0.9).fit_features(h, y)
    qb = torch.cat([q] * (256 // bq))
    qbf = feats_of(qb, w, b)
    t = timed({"ours": lambda: ours.score_features(qbf), "ref": lambda: ref.predict_features(qb)}, repeat)
    emit(
        "features/dice",
        t["ours"],
        t["ref"],
        {"C": c, "D": d, "B": qb.shape[0], "p": 90},
        spearman=round(spearman(ours.score_features(qbf), -ref.predict_features(qb)), 6),
    )


# ---------------------------------------------------------------------------------------------
# 4. GradNorm: closed form from one forward vs per-sample backward (pytorch-ood vmap)


def bench_gradnorm(quick: bool) -> None:
    pd = _pood()
    if pd is None:
        return
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=100).eval()
    x = torch.randn(16 if quick else 32, 3, 64, 64)
    ours = normscore.create("gradnorm").attach(model)
    # pytorch-ood's default differentiates w.r.t. all parameters (what users get); the paper's
    # GradNorm is the last layer only, so both are timed. Ours: one forward + the closed form.
    refs = {
        "all_params_default": pd.GradNorm(model, micro_batch_size=32),
        "last_layer": pd.GradNorm(model, param_filter=lambda n: n == "fc.weight", micro_batch_size=32),
    }
    feats = normscore.capture(ours.adapter, x, ours.capture_spec(ours.adapter, "score"))
    with torch.no_grad():
        fwd = timed({"f": lambda: model(x)}, 2)["f"]
    for tag, ref in refs.items():
        t = timed({"ours": lambda: ours.score(x), "ref": lambda: ref.predict(x)}, 2 if quick else 4)
        rho = spearman(ours.score(x), -ref.predict(x))
        emit(
            f"gradnorm/closed_form_vs_vmap/{tag}",
            t["ours"],
            t["ref"],
            {
                "model": "timm resnet18",
                "px": 64,
                "B": x.shape[0],
                "target": ">= 100x faster",
                "forward_s": round(fwd, 4),
            },
            spearman=round(rho, 6),
            detector_only_ratio=round(
                timed({"c": lambda: ours.score_features(feats)}, 3)["c"] / max(t["ref"] - fwd, 1e-9), 6
            ),
        )


# ---------------------------------------------------------------------------------------------
# 5. LDG: projected per-sample gradients (exact / sketched) vs vmap + dense projection


def bench_ldg(quick: bool) -> None:
    script = HERE / "ldg_perf.py"
    if not script.exists():
        print(json.dumps({"name": "ldg", "skipped": "benchmarks/ldg_perf.py missing"}))
        return
    args = [sys.executable, str(script)] + (["--quick"] if quick else [])
    r = subprocess.run(args, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if "ours_s" in row:
                emit(
                    row.pop("name"),
                    row.pop("ours_s"),
                    row.pop("ref_s"),
                    row.pop("params"),
                    **{k: v for k, v in row.items() if k != "ratio"},
                )
            else:
                print(line)
    if r.returncode:
        print(json.dumps({"name": "ldg", "error": r.stderr[-2000:]}))


# ---------------------------------------------------------------------------------------------
# 6. fit memory: peak RSS does not grow with N for streamed statistics


_MEM_CHILD = r"""
import sys, torch, normscore
sys.path.insert(0, {here!r})
from perf import FeatureModel, feats_of
name, n, d, c = sys.argv[1], int(sys.argv[2]), 512, 10
g = torch.Generator().manual_seed(0)
w, b = torch.randn(c, d, generator=g) / d ** 0.5, torch.zeros(c)
model = FeatureModel(w, b).eval()
normscore.get_adapter(model).ensure_resolved(torch.zeros(1, d, 1, 1))
def batches():
    for i in range(0, n, 1000):
        y = torch.arange(i, i + 1000) % c
        h = torch.randn(1000, d, generator=g).abs() + y[:, None].float() * 0.01
        yield feats_of(h, w, b, y)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
hp = dict(bank_dtype=sys.argv[3]) if len(sys.argv) > 3 else dict()
det = normscore.create(name, **hp).attach(model)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
det.fit_features(batches(), calibration=0.0)
print(status("VmHWM:") - before)
"""


def _peak_kb(name: str, n: int, *extra: str) -> int:
    """Peak-RSS growth (KiB) of one fit on ``n`` streamed samples, in a fresh process."""
    code = _MEM_CHILD.format(here=str(HERE))
    r = subprocess.run([sys.executable, "-c", code, name, str(n), *extra], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return int(r.stdout.split()[-1])


def bench_memory(quick: bool) -> None:
    small, large = (10_000, 50_000) if quick else (10_000, 100_000)
    for name in ("mahalanobis", "vim", "knn"):
        g10 = _peak_kb(name, small)
        g100 = _peak_kb(name, large)
        emit(
            f"fit_memory/{name}",
            g100 / 1024,
            max(g10, 1) / 1024,
            {
                "D": 512,
                "N_small": small,
                "N_large": large,
                "unit": "MiB of peak-RSS growth during fit (ours_s = N_large, ref_s = N_small)",
            },
            expectation="flat" if name != "knn" else "grows with N (bank)",
        )
    g32, g16 = _peak_kb("knn", large, "float32"), _peak_kb("knn", large, "float16")
    emit(
        "fit_memory/knn_bank_float16_vs_float32",
        g16 / 1024,
        g32 / 1024,
        {"D": 512, "N": large, "unit": "MiB of peak-RSS growth during fit"},
        bank_mib={"float32": round(large * 512 * 4 / 2**20, 1), "float16": round(large * 512 * 2 / 2**20, 1)},
    )


# ---------------------------------------------------------------------------------------------
# 7. distributed fit equals single-process fit


def bench_dist(quick: bool) -> None:
    script = HERE / "dist_fit.py"
    out = Path(tempfile.mkdtemp(prefix="normscore-dist-fit-"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    # --quick: the detectors of the issue (and the test) on 192 images; else all of them on 384
    sub = ["--samples", "192", "--detectors", "mahalanobis,vim,featurenorm,ldg"] if quick else []
    single = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--single", *sub], capture_output=True, text=True, env=env
    )
    t1 = time.perf_counter()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", "29531"]
    multi = subprocess.run([*torchrun, str(script), "--out", str(out), *sub], capture_output=True, text=True, env=env)
    t2 = time.perf_counter()
    if single.returncode or multi.returncode:
        print(json.dumps({"name": "dist_fit", "error": (single.stderr + multi.stderr)[-3000:]}))
        return
    cmp = subprocess.run([sys.executable, str(script), "--out", str(out), "--compare"], capture_output=True, text=True)
    print(cmp.stdout.strip())
    emit(
        "dist_fit/2_processes_vs_1",
        t2 - t1,
        t1 - t0,
        {"backend": "gloo", "world": 2},
        comparison=cmp.stdout.strip().splitlines()[-1:],
    )


SECTIONS = {
    "hooks": bench_hooks,
    "oneset": bench_oneset,
    "features": bench_features,
    "extra": bench_extra,
    "gradunc": bench_gradunc,
    "gradnorm": bench_gradnorm,
    "ldg": bench_ldg,
    "memory": bench_memory,
    "dist": bench_dist,
}


def main() -> None:
    global JSON_PATH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (< ~3 minutes)")
    ap.add_argument("--json", help="append the JSON lines to this file")
    ap.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    JSON_PATH = args.json
    if JSON_PATH and os.path.exists(JSON_PATH):
        os.remove(JSON_PATH)
    only = args.only.split(",") if args.only else list(SECTIONS)
    t0 = time.time()
    for s in only:
        t1 = time.time()
        SECTIONS[s](args.quick)
        print(json.dumps({"name": f"section/{s}", "seconds": round(time.time() - t1, 1)}), flush=True)
    print(
        json.dumps(
            {"name": "total", "seconds": round(time.time() - t0, 1), "threads": args.threads, "quick": args.quick}
        )
    )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
