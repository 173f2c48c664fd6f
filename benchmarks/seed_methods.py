"""Evidence for the seed methods: FeatureNorm/NormRatio, penultimate norm, LDG, GradNorm.

Fashion-MNIST is the ID set, with ``normscore.models.small_cnn()`` trained on CPU
(``train_classifier(model, fashion-mnist train, epochs=3, seed=0)``, or ``--checkpoint`` with a
state dict of exactly that recipe). OOD sets: ``mnist-5k``, ``sklearn-digits`` and ``textures``
(gray, 28 px). Prints markdown tables (the ones quoted in docs/seed-methods.md) and, with
``--json``, writes every number.

    .venv/bin/python benchmarks/seed_methods.py --checkpoint /work/devcache/smallcnn_fmnist_e3_s0.pt

Subsets (all deterministic, ``limit`` with seed 0): ``--fit-n`` ID training images for the
forward-only detectors and NormRatio, the first ``--ldg-fit-n`` of them for LDG (its fit is
``2 n_iter + 2`` forward+backward passes), ``--id-n`` ID test images, ``--ood-n`` images per OOD
set. Every fit holds out every 10th sample for the threshold (normscore's default). Times
are CPU seconds of this process (``--threads 1`` by default), not wall-clock.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

import normscore
from normscore.data import get_dataset
from normscore.detectors.ldg import LDG
from normscore.metrics import evaluate
from normscore.models import small_cnn
from normscore.taps import ALL_BLOCKS, BackwardSpec, CaptureSpec, Features, block_key, capture
from normscore.training import evaluate_accuracy, train_classifier

OOD_SETS = ("mnist-5k", "sklearn-digits", "textures")


def _clock() -> float:
    """CPU time of this process: with one thread it is the compute time, robust to other jobs
    sharing the cores (wall-clock times on a shared 2-core machine are not comparable)."""
    return time.process_time()


def _loader(ds, batch: int):
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def _metrics(id_s: torch.Tensor, ood: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for name, s in ood.items():
        r = evaluate(id_s, s)
        out[name] = {"auroc": r["auroc"], "fpr95": r["fpr95"]}
    out["mean"] = {k: float(np.mean([out[n][k] for n in ood])) for k in ("auroc", "fpr95")}
    return out


def _row(name: str, m: dict[str, dict[str, float]]) -> str:
    cells = [f"{100 * m[n]['auroc']:.1f} / {100 * m[n]['fpr95']:.1f}" for n in (*OOD_SETS, "mean")]
    return f"| `{name}` | " + " | ".join(cells) + " |"


def _header(first: str = "detector") -> str:
    cols = [f"{n} AUROC / FPR95" for n in OOD_SETS] + ["mean AUROC / FPR95"]
    return f"| {first} | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols)


def _capture_all(adapter, loader, spec, timer: list | None = None) -> Features:
    parts = []
    for x, _ in loader:
        t0 = _clock()
        f = capture(adapter, x, spec)
        if timer is not None:
            timer.append((_clock() - t0, x.shape[0]))
        parts.append(f.to("cpu"))
    return Features.cat(parts)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Subspace agreement of two representations of the same samples ``[N, K]``."""
    a = (a - a.mean(0)).double()
    b = (b - b.mean(0)).double()
    qa = torch.linalg.qr(a).Q
    qb = torch.linalg.qr(b).Q
    cc = torch.linalg.svdvals(qa.T @ qb)
    ka, kb = a @ a.T, b @ b.T
    cka = float((ka * kb).sum() / (ka.norm() * kb.norm()))
    return {"mean_sq_canonical_corr": float((cc**2).mean()), "linear_cka": cka}


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def engine_check(batch: int, k: int, size: int) -> dict[str, float]:
    """Exact projection route vs torch.func vmap + GEMM on timm resnet18 (random weights and V).

    Times (CPU s, best of 2) of: our projection (one forward + one batched backward, per-layer
    formation and GEMM), forward+backward alone, forward+backward+formation (no projection),
    the projection GEMM ``[B, |theta|] @ [|theta|, K]`` alone, and vmap of full per-sample
    gradients followed by that GEMM.
    """
    from ldg_perf import resnet18_engine

    e = resnet18_engine(batch, k, size, seed=None)
    fns = {
        "ours_s": e["ours"],
        "forward_backward_s": e["fwd_bwd"],
        "forward_backward_formation_s": e["fwd_bwd_formation"],
        "gemm_s": e["gemm"],
        "vmap_s": e["vmap"],
    }
    out: dict[str, float] = {"batch": batch, "k": k, "size": size, "params": e["dim"]}
    for name, fn in fns.items():
        fn()
        best = float("inf")
        for _ in range(2):
            t0 = _clock()
            fn()
            best = min(best, _clock() - t0)
        out[name] = best
    out["max_abs_diff"] = float((fns["ours_s"]() - fns["vmap_s"]()).abs().max())
    out["gemm_efficiency"] = out["gemm_s"] / out["ours_s"]
    out["speedup_vs_vmap"] = out["vmap_s"] / out["ours_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="state dict of small_cnn() trained with the recipe above")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fit-n", type=int, default=10000)
    ap.add_argument("--ldg-fit-n", type=int, default=5000)
    ap.add_argument("--id-n", type=int, default=2000)
    ap.add_argument("--ood-n", type=int, default=1000)
    ap.add_argument("--components", type=int, default=200)
    ap.add_argument("--n-iter", type=int, default=3)
    ap.add_argument("--n-iter-check", type=int, default=8, help="a second exact fit to check convergence")
    ap.add_argument("--sketch-dim", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument(
        "--engine-check",
        action="store_true",
        help="only time the exact projection route on timm resnet18 (32 px, B=32 and 224 px, B=16; K=128)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine_check:
        rows = [engine_check(32, 128, 32), engine_check(16, 128, 224)]
        print("| input | B | K | ours | fwd+bwd | fwd+bwd+formation | GEMM alone | vmap+GEMM | GEMM/ours | vs vmap |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['size']} px | {r['batch']} | {r['k']} | {r['ours_s']:.2f} | {r['forward_backward_s']:.2f} | "
                f"{r['forward_backward_formation_s']:.2f} | {r['gemm_s']:.2f} | {r['vmap_s']:.2f} | "
                f"{r['gemm_efficiency']:.2f} | {r['speedup_vs_vmap']:.2f}x |"
            )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    torch.manual_seed(0)
    out: dict = {"args": vars(args), "machine": {"python": platform.python_version(), "torch": torch.__version__}}
    t_start = time.perf_counter()

    # ---- model
    model = small_cnn()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    else:
        train_classifier(model, get_dataset("fashion-mnist", "train"), epochs=args.epochs, seed=0)
    model.eval()
    id_test = get_dataset("fashion-mnist", "test", limit=args.id_n, seed=0)
    out["id_accuracy"] = evaluate_accuracy(model, id_test)
    fit_set = get_dataset("fashion-mnist", "train", limit=args.fit_n, seed=0)
    ldg_set = torch.utils.data.Subset(fit_set, range(min(args.ldg_fit_n, len(fit_set))))
    oods = {n: get_dataset(n, "test", channels=1, image_size=28, limit=args.ood_n, seed=0) for n in OOD_SETS}
    sizes = {
        "fit": len(fit_set),
        "ldg_fit": len(ldg_set),
        "id_test": len(id_test),
        **{n: len(d) for n, d in oods.items()},
    }
    out["sizes"] = sizes
    print(f"ID accuracy (fashion-mnist test subset): {100 * out['id_accuracy']:.2f}%  sizes: {sizes}")
    tests = {"id": _loader(id_test, args.batch), **{n: _loader(d, args.batch) for n, d in oods.items()}}
    adapter = normscore.get_adapter(model)

    # ---- forward-only detectors in one shared pass
    dets = [
        "msp",
        "energy",
        "penultimate_norm",
        "gradnorm",
        normscore.create("featurenorm"),
        normscore.create("featurenorm", on="msp"),
        normscore.create("featurenorm", on="energy"),
    ]
    t0 = _clock()
    ds = normscore.DetectorSet(dets).fit(model, _loader(fit_set, args.batch))
    out["forward_fit_s"] = _clock() - t0
    spec = ds.capture_spec("score") | CaptureSpec(logits=False, blocks=frozenset({(ALL_BLOCKS, "featurenorm")}))
    feats = {n: _capture_all(adapter, ld, spec) for n, ld in tests.items()}
    results = {}
    for key, det in ds.detectors.items():
        label = f"featurenorm(on={det.on})" if key.startswith("featurenorm") else key
        sc = {n: det.score_features(f) for n, f in feats.items()}
        results[label] = _metrics(sc["id"], {n: sc[n] for n in OOD_SETS})

    # ---- NormRatio table next to each block's test AUROC
    fn = ds["featurenorm"]
    blocks = []
    for r in fn.block_report_:
        k = block_key(r["block"], "featurenorm")
        m = _metrics(feats["id"][k], {n: feats[n][k] for n in OOD_SETS})
        blocks.append({**r, "selected": r["block"] == fn.block_, "metrics": m})
    out["blocks"] = blocks

    # ---- LDG exact and sketched
    ldg_runs = {}
    for method in ("exact", "sketch"):
        det = LDG(
            n_components=args.components,
            method=method,
            n_iter=args.n_iter,
            sketch_dim=args.sketch_dim,
            seed=0,
        )
        t0 = _clock()
        det.fit(model, _loader(ldg_set, args.batch))
        fit_s = _clock() - t0
        timer: list = []
        sp = det.capture_spec(adapter, "score") | CaptureSpec(penultimate=True)
        f = {n: _capture_all(adapter, ld, sp, timer) for n, ld in tests.items()}
        score_s = sum(t for t, _ in timer)
        n_scored = sum(b for _, b in timer)
        glow = {n: det._glow(ff).cpu() for n, ff in f.items()}
        per_scoring = {}
        for scoring in ("knn", "probe_msp", "probe_energy", "ensemble"):
            det.set_params(scoring=scoring)
            sc = {n: det.score_features(ff) for n, ff in f.items()}
            per_scoring[scoring] = {"metrics": _metrics(sc["id"], {n: sc[n] for n in OOD_SETS}), "scores": sc}
        det.set_params(scoring="knn")
        ldg_runs[method] = {
            "det": det,
            "fit_s": fit_s,
            "score_s_per_1k": 1000 * score_s / n_scored,
            "dim": det.dim_,
            "solver": det.solver_,
            "n_components": det.n_components_,
            "explained_variance_top10": det.explained_variance_ratio_[:10].tolist(),
            "glow": glow,
            "scorings": per_scoring,
        }
        label = f"ldg ({method})"
        for scoring, v in per_scoring.items():
            results[f"{label}, {scoring}"] = v["metrics"]
        print(f"{label}: fit {fit_s:.1f} s, scoring {1000 * score_s / n_scored:.1f} s / 1k images, dim {det.dim_}")

    # convergence of the subspace iteration: n_iter vs a longer run (same data, same seed)
    ex_det = ldg_runs["exact"]["det"]
    long = LDG(n_components=args.components, n_iter=args.n_iter_check, seed=0)
    t0 = _clock()
    long.fit(model, _loader(ldg_set, args.batch))
    long_fit_s = _clock() - t0

    def unfold(d):
        s_ = d.inv_std_.cpu()
        return torch.where(s_[:, None] > 0, d.components_.cpu() / s_.clamp_min(1e-30)[:, None], torch.zeros(()))

    cos = torch.linalg.svdvals(unfold(ex_det).double().T @ unfold(long).double())
    lspec = long.capture_spec(adapter, "score")
    sc_long = {n: long.score_features(_capture_all(adapter, ld, lspec)) for n, ld in tests.items()}
    conv = {
        "n_iter": args.n_iter,
        "n_iter_long": args.n_iter_check,
        "long_fit_s": long_fit_s,
        "principal_cos_min": float(cos.min()),
        "principal_cos_sq_mean": float((cos**2).mean()),
        "top10_cos_min": float(
            torch.linalg.svdvals(unfold(ex_det)[:, :10].double().T @ unfold(long)[:, :10].double()).min()
        ),
        "sv_rel_diff_top10": float(
            ((ex_det.singular_values_[:10] - long.singular_values_[:10]).abs() / long.singular_values_[:10]).max()
        ),
        "knn_metrics_long": _metrics(sc_long["id"], {n: sc_long[n] for n in OOD_SETS}),
    }
    results[f"ldg (exact, n_iter={args.n_iter_check}), knn"] = conv["knn_metrics_long"]

    # forward + backward alone (the floor both LDG routes share)
    lse = BackwardSpec(objective=lambda z: torch.logsumexp(z, 1))
    timer = []
    for ld in tests.values():
        _capture_all(adapter, ld, CaptureSpec(backward=lse), timer)
    fb_per_1k = 1000 * sum(t for t, _ in timer) / sum(b for _, b in timer)
    ex, sk = ldg_runs["exact"], ldg_runs["sketch"]
    all_e = torch.cat([ex["glow"][n] for n in tests])
    all_s = torch.cat([sk["glow"][n] for n in tests])
    knn_e = torch.cat([ex["scorings"]["knn"]["scores"][n] for n in tests])
    knn_s = torch.cat([sk["scorings"]["knn"]["scores"][n] for n in tests])
    out["ldg"] = {m: {k: v for k, v in r.items() if k not in ("det", "glow", "scorings")} for m, r in ldg_runs.items()}
    out["ldg"]["forward_backward_s_per_1k"] = fb_per_1k
    out["ldg"]["convergence"] = conv
    out["ldg"]["speedup_fit"] = ex["fit_s"] / sk["fit_s"]
    out["ldg"]["speedup_score"] = ex["score_s_per_1k"] / sk["score_s_per_1k"]
    out["ldg"]["speedup_score_engine_only"] = (ex["score_s_per_1k"] - fb_per_1k) / max(
        sk["score_s_per_1k"] - fb_per_1k, 1e-9
    )
    out["ldg"]["agreement_test_sets"] = _agreement(all_e, all_s)
    out["ldg"]["knn_score_spearman"] = _spearman(knn_e, knn_s)

    # exact route vs torch.func vmap of full per-sample gradients (one batch of 64)
    det = ex["det"]
    xb = torch.stack([id_test[i][0] for i in range(64)])
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    bufs = dict(model.named_buffers())
    slots = det._layer_map().slots
    order = [f"{s.name}.{p}" for s in slots for p in s.params]

    def f1(p, xi):
        return torch.logsumexp(functional_call(model, (p, bufs), (xi[None],)), 1)[0]

    def ref_route():
        g = vmap(grad(f1), in_dims=(None, 0))(params, xb)
        return torch.cat([g[n].reshape(64, -1) for n in order], 1) @ det.components_ - det.offset_

    def timed(fn, reps=3):
        best = float("inf")
        res = None
        for _ in range(reps):
            t0 = _clock()
            res = fn()
            best = min(best, _clock() - t0)
        return best, res

    t_ours, ours = timed(lambda: det.transform(xb))
    t_ref, ref = timed(ref_route)
    gmat = torch.randn(64, det.dim_)
    t_gemm, _ = timed(lambda: gmat @ det.components_)
    t_fb, _ = timed(lambda: capture(adapter, xb, CaptureSpec(backward=lse)))
    out["ldg"]["vs_vmap"] = {
        "batch": 64,
        "ours_s": t_ours,
        "vmap_s": t_ref,
        "speedup": t_ref / t_ours,
        "max_abs_diff": float((ours - ref).abs().max()),
        "max_abs_value": float(ref.abs().max()),
        "gemm_s": t_gemm,
        "gemm_efficiency": t_gemm / t_ours,
        "forward_backward_s": t_fb,
        "gemm_efficiency_net_of_fwd_bwd": t_gemm / max(t_ours - t_fb, 1e-9),
    }
    out["results"] = results
    out["total_s"] = time.perf_counter() - t_start

    # ---- print
    print("\n### NormRatio block selection vs. each block's test AUROC\n")
    print("| block | NormRatio | mean ID norm | mean jigsaw norm | " + " | ".join(OOD_SETS) + " | mean AUROC |")
    print("|---|---:|---:|---:|" + "---:|" * (len(OOD_SETS) + 1))
    for b in blocks:
        mark = " **(selected)**" if b["selected"] else ""
        cells = " | ".join(f"{100 * b['metrics'][n]['auroc']:.1f}" for n in OOD_SETS)
        print(
            f"| `{b['block']}`{mark} | {b['norm_ratio']:.4f} | {b['mean_id_norm']:.3f} | {b['mean_jigsaw_norm']:.3f} | "
            f"{cells} | {100 * b['metrics']['mean']['auroc']:.1f} |"
        )
    print("\n### AUROC / FPR95 (%, ID positive)\n")
    print(_header())
    for name, m in results.items():
        print(_row(name, m))
    L = out["ldg"]
    print("\n### LDG: exact vs. sketched\n")
    print("| | exact | sketch |\n|---|---:|---:|")
    print(f"| gradient representation dim | {L['exact']['dim']:,} | {L['sketch']['dim']:,} |")
    print(f"| subspace solver | {L['exact']['solver']} | {L['sketch']['solver']} |")
    print(f"| fit time (s) | {L['exact']['fit_s']:.1f} | {L['sketch']['fit_s']:.1f} |")
    print(
        f"| scoring time (s / 1k images) | {L['exact']['score_s_per_1k']:.2f} | {L['sketch']['score_s_per_1k']:.2f} |"
    )
    print(
        f"\nforward+backward alone: {L['forward_backward_s_per_1k']:.2f} s / 1k images; speed-up of the sketch: "
        f"fit {L['speedup_fit']:.1f}x, scoring {L['speedup_score']:.2f}x (gradient engine alone "
        f"{L['speedup_score_engine_only']:.1f}x)"
    )
    ag = L["agreement_test_sets"]
    print(
        f"agreement on the test images: mean squared canonical correlation {ag['mean_sq_canonical_corr']:.3f}, "
        f"linear CKA {ag['linear_cka']:.3f}, Spearman of the KNN scores {L['knn_score_spearman']:.3f}"
    )
    c = L["convergence"]
    print(
        f"subspace iteration n_iter={c['n_iter']} vs {c['n_iter_long']}: principal-angle cosines min "
        f"{c['principal_cos_min']:.3f} (top-10 components: {c['top10_cos_min']:.4f}), mean cos^2 "
        f"{c['principal_cos_sq_mean']:.3f}, top-10 singular values within {100 * c['sv_rel_diff_top10']:.2f}%"
    )
    v = L["vs_vmap"]
    print(
        f"exact route vs torch.func vmap (batch 64): {v['ours_s']:.3f} s vs {v['vmap_s']:.3f} s "
        f"({v['speedup']:.2f}x), max |diff| {v['max_abs_diff']:.2e} (values up to {v['max_abs_value']:.1f}); "
        f"projection GEMM alone {v['gemm_s']:.3f} s -> efficiency {v['gemm_efficiency']:.2f} "
        f"({v['gemm_efficiency_net_of_fwd_bwd']:.2f} net of the {v['forward_backward_s']:.3f} s forward+backward)"
    )
    print(f"\ntotal {out['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
