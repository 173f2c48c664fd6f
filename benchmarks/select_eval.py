"""How well does selection without OOD data predict the test-OOD ranking? (issue 15, item 3)

On the bench's Fashion-MNIST suite (``normscore-bench`` defaults: ``smallcnn`` trained 3 epochs,
seed 0, cached by recipe; near-OOD mnist-5k / opencv-digits / sklearn-digits, far-OOD textures /
photos / noise), for every configuration of every cached (feature-only) detector's search grid:

* **truth**: the configuration fitted on the bench's fit split (``--fit-size`` training images,
  cached features) and scored on the test splits (``--test-size`` ID test images vs each OOD
  set); target = mean AUROC over the OOD sets (``--target all``, or ``near`` / ``far``);
* **pseudo-OOD**: :func:`normscore.select` on the same fit split (fits on its 80% fit part,
  scores the 20% held out vs pseudo-OOD of them), every kind of
  :data:`normscore.select.PSEUDO_OOD`; ``mean`` is the mean AUROC over the default kinds
  (:data:`normscore.select.DEFAULT_KINDS`), the criterion ``--val-ood pseudo`` uses;
* **val-ood**: the bench's ``--search`` with real validation OOD data (``--val-size`` other
  training images vs opencv-photos), for comparison;
* **defaults**: every detector at its default hyperparameters (per-detector regret only).

For each criterion it prints: Spearman's rho over the configurations between the criterion's
AUROC and the test AUROC (``rho cfg``) and over the detectors, each at the configuration the
criterion picks for it (``rho det``); the regret of the overall pick (best test AUROC among all
configurations minus the test AUROC of the configuration the criterion ranks first, in AUROC
points); the mean per-detector regret of the hyperparameter pick (over detectors with a grid).
Configurations that fail (e.g. k larger than the bank) are left out of every column.

    python benchmarks/select_eval.py --cache-dir DIR [--fit-size 10000 --test-size 1000]
        [--detectors all|a,b,c] [--max-grid N] [--json out.json]

``--max-grid N`` keeps at most N configurations per detector (evenly spaced over its grid, the
first and last included) - weiper's grid alone has 900. Features are cached in ``--cache-dir``
like the bench's (the model too: a second run re-trains nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

import normscore
from normscore.bench.cache import spec_keys
from normscore.bench.config import BenchConfig, resolve_device
from normscore.bench.plan import plan_detectors, plan_splits
from normscore.bench.runner import _Run
from normscore.bench.search import search_configs
from normscore.metrics import evaluate
from normscore.select import DEFAULT_KINDS, PSEUDO_OOD


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):
        m = a == v
        ranks[m] = ranks[m].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def thin(configs: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    if n is None or len(configs) <= n:
        return configs
    idx = sorted({round(i * (len(configs) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
    return [configs[i] for i in idx]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--fit-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--detectors", default="all")
    ap.add_argument("--max-grid", type=int, default=None)
    ap.add_argument("--target", default="all", choices=("all", "near", "far"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()

    cfg = BenchConfig(
        id="fashion-mnist",
        detectors=args.detectors,
        fit_size=args.fit_size,
        test_size=args.test_size,
        val_size=args.val_size,
        search=True,  # loads the validation sets (val-ood row)
        seed=args.seed,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        device="cpu",
        out=None,
        plots=False,
        progress=False,
    )
    run = _Run(cfg)
    run.plan = plan_splits(cfg)
    run.device = resolve_device(cfg.device)
    run.preflight()
    run.load_inputs()
    model, adapter = run.lm.model, run.adapter
    runs = plan_detectors(cfg.detectors, model, adapter, lambda m: print(m, file=sys.stderr))
    cached = [r for r in runs if r.error is None and r.mode == "cached"]
    skipped = sorted(r.name for r in runs if r not in cached)
    configs = {r.name: thin(search_configs(r.name, True), args.max_grid) for r in cached}
    cands = [(n, c) for n, cs in configs.items() for c in cs]
    print(f"{len(cands)} configurations of {len(configs)} detectors; skipped (live/failed): {skipped}", file=sys.stderr)

    # ---- truth: fit on the fit split, score on the test splits (and the validation splits)
    cached, fit_feats = run.extract_fit(cached, configs)
    fitted: dict[int, Any] = {}
    keys: set[str] = {"logits"}
    for i, (n, c) in enumerate(cands):
        try:
            det = run._fit(n, c, fit_feats)
            keys |= spec_keys(det.capture_spec(adapter, "score"), adapter)
            fitted[i] = det
        except Exception as e:  # noqa: BLE001
            print(f"truth: {n} {c}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
    ood = [r for r in run.plan.ood_refs if args.target == "all" or r.group == args.target]
    splits = ["id", *[r.label for r in ood], "val-id", "val-ood"]
    feats = {k: run.extractor.features(k, keys) for k in splits}
    test_auc: dict[int, float] = {}
    val_auc: dict[int, float] = {}
    for i, det in fitted.items():
        try:
            s = {k: run._score(det, feats[k]) for k in splits}
            if not all(np.isfinite(v).all() for v in s.values()):
                raise FloatingPointError("non-finite scores")
            test_auc[i] = float(np.mean([evaluate(s["id"], s[r.label])["auroc"] for r in ood]))
            val_auc[i] = float(evaluate(s["val-id"], s["val-ood"])["auroc"])
        except Exception as e:  # noqa: BLE001
            print(f"truth: {cands[i]}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
    t_truth = time.time() - t0

    # ---- pseudo-OOD: normscore.select on the fit split (ID training images only)
    loader = torch.utils.data.DataLoader(run.sets["fit"], batch_size=args.batch_size, shuffle=False)
    t1 = time.time()
    sel = normscore.select(model, loader, cands, pseudo_ood=list(PSEUDO_OOD), seed=args.seed, refit=None)
    t_select = time.time() - t1
    pseudo: dict[str, dict[int, float]] = {k: {} for k in [*PSEUDO_OOD, "mean"]}
    for c in sel.ranking:
        if c.error is None:
            for k in PSEUDO_OOD:
                pseudo[k][c.order] = c.auroc[k]
            pseudo["mean"][c.order] = float(np.mean([c.auroc[k] for k in DEFAULT_KINDS]))

    # ---- the table
    criteria: dict[str, dict[int, float]] = {**pseudo, "val-ood": val_auc}
    names = list(configs)
    by_det = {n: [i for i, (m, _) in enumerate(cands) if m == n] for n in names}
    best_test = max(test_auc.values())
    rows = []
    for crit, vals in criteria.items():
        common = [i for i in test_auc if i in vals]
        rho_cfg = spearman([vals[i] for i in common], [test_auc[i] for i in common])
        pick = min(common, key=lambda i: (-vals[i], i))
        regret = 100 * (best_test - test_auc[pick])
        det_picks, hp_regret = {}, []
        for n in names:
            ok = [i for i in by_det[n] if i in common]
            if not ok:
                continue
            p = min(ok, key=lambda i: (-vals[i], i))
            det_picks[n] = p
            if len(ok) > 1:
                hp_regret.append(100 * (max(test_auc[i] for i in ok) - test_auc[p]))
        rho_det = spearman([vals[p] for p in det_picks.values()], [test_auc[p] for p in det_picks.values()])
        rows.append(
            {
                "criterion": crit,
                "rho_cfg": rho_cfg,
                "rho_det": rho_det,
                "pick": f"{cands[pick][0]} {cands[pick][1]}",
                "pick_test_auroc": 100 * test_auc[pick],
                "regret": regret,
                "hp_regret_mean": float(np.mean(hp_regret)) if hp_regret else float("nan"),
                "n": len(common),
            }
        )
    default_regret = []
    for n in names:
        ok = [i for i in by_det[n] if i in test_auc]
        defaults = normscore.detector_info(n)["hyperparameters"]
        d = next((i for i in ok if all(defaults.get(k) == v for k, v in cands[i][1].items())), None)
        if d is not None and len(ok) > 1:
            default_regret.append(100 * (max(test_auc[i] for i in ok) - test_auc[d]))
    rows.append(
        {
            "criterion": "defaults",
            "rho_cfg": float("nan"),
            "rho_det": float("nan"),
            "pick": "-",
            "pick_test_auroc": float("nan"),
            "regret": float("nan"),
            "hp_regret_mean": float(np.mean(default_regret)) if default_regret else float("nan"),
            "n": len(default_regret),
        }
    )
    best_i = max(test_auc, key=lambda i: (test_auc[i], -i))
    print(
        f"Fashion-MNIST, smallcnn ({run.lm.weights_sha256[:12]}); fit {len(run.sets['fit'])}, test {args.test_size} "
        f"per split, OOD ({args.target}): {', '.join(r.label for r in ood)}; {len(test_auc)} configurations of "
        f"{len(names)} detectors scored; best on test: {cands[best_i][0]} {cands[best_i][1]} "
        f"({100 * test_auc[best_i]:.2f})"
    )
    print(f"select: fit part {sel.n_fit}, held out {sel.n_heldout}; {t_select:.0f} s; truth {t_truth:.0f} s")
    print()
    print("| criterion | rho cfg | rho det | pick | pick test AUROC | regret | mean hp regret | n |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")

    def f(v: float, digits: int = 2) -> str:
        return "-" if not np.isfinite(v) else f"{v:.{digits}f}"

    for r in rows:
        print(
            f"| {r['criterion']} | {f(r['rho_cfg'], 3)} | {f(r['rho_det'], 3)} | {r['pick']} "
            f"| {f(r['pick_test_auroc'])} | {f(r['regret'])} | {f(r['hp_regret_mean'])} | {r['n']} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "args": vars(args),
                    "rows": rows,
                    "configs": [
                        {
                            "name": n,
                            "params": c,
                            "test_auroc": test_auc.get(i),
                            "val_auroc": val_auc.get(i),
                            **{f"pseudo_{k}": pseudo[k].get(i) for k in pseudo},
                        }
                        for i, (n, c) in enumerate(cands)
                    ],
                },
                fh,
                indent=1,
                default=str,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
