"""LDG speed: the exact projection route vs vmap and vs the projection GEMM; sketch vs exact.

Called by ``benchmarks/perf.py`` (section ``ldg``); also runs on its own. Prints JSON lines
``{"name", "ours_s", "ref_s", "ratio", "params", ...}`` with ``ratio = ours_s / ref_s``.

1. ``ldg/exact_vs_vmap``: per-sample projections ``v(x)^T V`` from one forward and one batched
   backward pass with per-layer closed-form gradients (``normscore.detectors.engines.persample``, layers from ``.layers``) against
   ``torch.func.vmap(grad(...))`` of full per-sample gradients followed by the dense projection,
   on timm ``resnet18`` (random weights, 32 px, batch 32, all parameters). Same outputs: the max
   relative difference is printed.
2. ``ldg/exact_vs_gemm``: the same route against the projection GEMM ``[B, |theta|] @ [|theta|, K]``
   alone, the bound of any exact method; ``gemm_efficiency = gemm_s / ours_s``.
3. ``ldg/sketch_vs_exact_fit`` and ``ldg/sketch_vs_exact_score``: the Kronecker sketch against
   the exact route on a small CNN trained here on Fashion-MNIST, fitted on the same images, with
   the AUROC of both on Fashion-MNIST test vs MNIST-5k next to the times.

    python benchmarks/ldg_perf.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import normscore
from normscore.metrics import auroc
from normscore.taps import BackwardSpec, CaptureSpec, capture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import timed  # noqa: E402  (median of interleaved repeats, one warm-up)


def emit(name: str, ours: float, ref: float, params: dict, **extra: object) -> None:
    row = {"name": name, "ours_s": round(ours, 6), "ref_s": round(ref, 6), "ratio": round(ours / ref, 4)}
    row["params"] = params
    row.update(extra)
    print(json.dumps(row), flush=True)


def resnet18_engine(batch: int, k: int, size: int, seed: int | None = 0) -> dict:
    """The exact projection route and its references on timm resnet18 (random weights and V):
    callables ``ours`` (one forward + one batched backward, per-layer gradients projected),
    ``vmap`` (full per-sample gradients + dense projection), ``gemm`` (the projection GEMM
    alone), ``fwd_bwd`` and ``fwd_bwd_formation``; ``dim`` = number of parameters."""
    import timm
    from torch.func import functional_call, grad, vmap

    from normscore.detectors.engines.layers import resolve_layers
    from normscore.detectors.engines.persample import ExactGradients

    if seed is not None:
        torch.manual_seed(seed)
    m = timm.create_model("resnet18", num_classes=1000).eval()
    x = torch.randn(batch, 3, size, size)
    ad = normscore.get_adapter(m)
    ad.ensure_resolved(x)
    eng = ExactGradients(resolve_layers(ad, "all", x).slots)
    v = torch.randn(eng.dim, k) * 1e-3
    params = {n: p.detach() for n, p in m.named_parameters()}
    bufs = dict(m.named_buffers())
    order = [f"{s.name}.{p}" for s in eng.slots for p in s.params]
    g = torch.randn(batch, eng.dim)
    lse = BackwardSpec(objective=lambda z: torch.logsumexp(z, 1))

    def f1(p, xi):
        return torch.logsumexp(functional_call(m, (p, bufs), (xi[None],)), 1)[0]

    def vm():
        gr = vmap(grad(f1), in_dims=(None, 0))(params, x)
        return torch.cat([gr[n].reshape(batch, -1) for n in order], 1) @ v

    return {
        "dim": eng.dim,
        "ours": lambda: capture(ad, x, CaptureSpec(backward=eng.projection_spec(v, "p")))["p"],
        "vmap": vm,
        "gemm": lambda: g @ v,
        "fwd_bwd": lambda: capture(ad, x, CaptureSpec(backward=lse)),
        "fwd_bwd_formation": lambda: eng.run(ad, x, lambda i, r0, f: None),
    }


def engine(quick: bool) -> None:
    batch, k, size = (16, 32, 32) if quick else (32, 200, 32)
    e = resnet18_engine(batch, k, size)
    ours, ref = e["ours"], e["vmap"]
    a, b = ours(), ref()
    rel = float((a - b).abs().max() / b.abs().max())
    t = timed({"ours": ours, "ref": ref, "gemm": e["gemm"], "fwd_bwd": e["fwd_bwd"]}, 2 if quick else 3)
    p = {"model": "timm resnet18", "params": e["dim"], "K": k, "batch": batch, "px": size}
    emit("ldg/exact_vs_vmap", t["ours"], t["ref"], p, max_rel_diff=rel, target="faster (issue prototype 1.7x)")
    emit(
        "ldg/exact_vs_gemm",
        t["ours"],
        t["gemm"],
        p,
        gemm_efficiency=round(t["gemm"] / t["ours"], 3),
        forward_backward_s=round(t["fwd_bwd"], 4),
        target="gemm_efficiency >= 0.75",
    )


def sketch_vs_exact(quick: bool) -> None:
    from normscore.data import get_dataset
    from normscore.models import small_cnn
    from normscore.training import train_classifier

    n_train, n_fit, n_test, k = (3000, 400, 400, 32) if quick else (10000, 2000, 1000, 100)
    train = get_dataset("fashion-mnist", "train", limit=n_train, seed=0)
    model = train_classifier(small_cnn(width=16), train, epochs=1, seed=0, progress=False)
    fit = torch.utils.data.DataLoader(get_dataset("fashion-mnist", "train", limit=n_fit, seed=1), batch_size=100)
    xi = get_dataset("fashion-mnist", "test", limit=n_test, seed=0).tensors()[0]
    xo = get_dataset("mnist-5k", "test", limit=n_test, seed=0).tensors()[0]
    dets, fit_s, score_s, aucs = {}, {}, {}, {}
    for method in ("exact", "sketch"):
        det = normscore.create("ldg", method=method, n_components=k)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det.fit(model, fit)
        fit_s[method] = time.perf_counter() - t0
        dets[method] = det
    t = timed({m: (lambda d=d: d.score(xi[:200])) for m, d in dets.items()}, 2 if quick else 3)
    for method, det in dets.items():
        score_s[method] = t[method]
        aucs[method] = auroc(det.score(xi), det.score(xo))
    p = {
        "model": "small_cnn(width=16), 1 epoch on Fashion-MNIST",
        "params": int(dets["exact"].dim_),
        "sketch_dim": int(dets["sketch"].dim_),
        "K": k,
        "fit_images": n_fit,
        "ood": "mnist-5k",
    }
    auc = {m: round(float(a), 4) for m, a in aucs.items()}
    emit(
        "ldg/sketch_vs_exact_fit",
        fit_s["sketch"],
        fit_s["exact"],
        p,
        auroc=auc,
        auroc_diff=round(auc["sketch"] - auc["exact"], 4),
        target="speed-up >= 10x",
    )
    emit("ldg/sketch_vs_exact_score", score_s["sketch"], score_s["exact"], {**p, "batch": 200}, auroc=auc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    engine(args.quick)
    sketch_vs_exact(args.quick)


if __name__ == "__main__":
    main()
