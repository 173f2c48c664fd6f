"""Evidence for normscore.finetune on Fashion-MNIST(-LT) with small_cnn on the CPU.

Two tracks, every row with the same seeds, data, augmentation and budget:

* ``lt``  - Fashion-MNIST-LT (rho = 0.01, 14,886 training images), trained from scratch:
  LA-CE, LA-CE+OE, RNA (non-affine BN, as the paper's models) and RNA with ordinary (affine) BN.
  Adam lr 1e-3, wd 5e-4, per-step cosine, batch 128 ID (+128 auxiliary OOD), ``--epochs``.
* ``sep`` - balanced Fashion-MNIST (60k): a CE model pretrained for ``--pretrain-epochs``
  (SGD Nesterov lr 0.1) is fine-tuned for ``--finetune-epochs`` with CE, CE+OE and Separation
  (PFS recipe: SGD Nesterov lr 0.07, per-step cosine, 128 ID + 256 OOD, separation and
  clustering losses from the middle epoch on).

Every trained model is scored with msp, energy, penultimate_norm and separation (the
registered detectors, eval mode) on the Fashion-MNIST test set (ID) against mnist-5k,
opencv-digits, sklearn-digits, textures, photos and noise. The auxiliary OOD set is ``normscore.finetune.aux_ood_dataset`` (20,000 crops of
scikit-image images that no test set uses).

    python benchmarks/finetune_fmnist.py run --track lt --seeds 0 1 2
    python benchmarks/finetune_fmnist.py run --track sep --seeds 0 1 2
    python benchmarks/finetune_fmnist.py report --json benchmarks/results/finetune_fmnist.json
    python benchmarks/finetune_fmnist.py norms --seed 0     # median ||z|| per set (diagnostic)

``run`` is resumable: finished rows are skipped, interrupted trainings continue from their
last checkpoint. ``report`` prints the markdown tables quoted in docs/finetune.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from normscore import CaptureSpec, capture, get_adapter
from normscore import finetune as ft
from normscore.data import get_dataset
from normscore.models import small_cnn

OOD_CANDIDATES = ["mnist-5k", "opencv-digits", "sklearn-digits", "textures", "photos", "noise"]
DETECTORS = ["msp", "energy", "penultimate_norm", "separation"]
LT_ROWS = {  # row name -> (method, non-affine BN)
    "LA-CE": ("la_ce", False),
    "LA-CE+OE": ("la_ce_oe", False),
    "RNA": ("rna", True),
    "RNA (affine BN)": ("rna", False),
}
SEP_ROWS = ["pretrained CE", "CE", "CE+OE", "Separation"]
SEP_METHOD = {"CE": "ce", "CE+OE": "ce_oe", "Separation": "separation"}


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-").replace("--", "-")


def ood_sets() -> dict[str, torch.utils.data.Dataset]:
    return {n: get_dataset(n, "test", channels=1, image_size=28) for n in OOD_CANDIDATES}


def evaluate_model(model, counts, cache: dict) -> dict:
    if "id" not in cache:
        cache["id"] = get_dataset("fashion-mnist", "test")
        cache["ood"] = ood_sets()
    acc = ft.accuracy_report(model, cache["id"], counts)
    rep = ft.ood_report(model, cache["id"], cache["ood"], DETECTORS)
    return {"accuracy": acc, "ood": rep, "ood_sets": list(cache["ood"])}


def run_lt(a, seed: int, cache: dict) -> None:
    train = get_dataset("fashion-mnist", "train")
    lt, counts = ft.long_tail_subset(train, a.rho)
    aux = ft.aux_ood_dataset(a.aux_n, channels=1, image_size=28, seed=0)
    for row, (method, non_affine) in LT_ROWS.items():
        out = os.path.join(a.work, "results", f"lt-{slug(row)}-s{seed}.json")
        if os.path.exists(out):
            continue
        cfg = ft.FinetuneConfig.preset(
            method, epochs=a.epochs, batch_size=128, lr=1e-3, weight_decay=5e-4, non_affine_bn=non_affine, seed=seed
        )
        torch.manual_seed(seed)
        model = small_cnn(10, 1, a.width)
        t0 = time.time()
        res = ft.finetune(
            model,
            lt,
            cfg,
            aux_ood=aux if cfg.uses_ood else None,
            class_counts=counts,
            out_dir=os.path.join(a.work, f"lt-{slug(row)}-s{seed}"),
            resume=True,
            progress=not a.quiet,
        )
        secs = time.time() - t0
        r = evaluate_model(res.model, counts, cache)
        r.update(track="lt", row=row, seed=seed, config=cfg.to_dict(), history=res.history, train_seconds=secs)
        save(out, r)
        print(f"[lt] {row} seed {seed}: acc {r['accuracy']['overall']:.4f} ({secs:.0f}s)", flush=True)


def run_sep(a, seed: int, cache: dict) -> None:
    train = get_dataset("fashion-mnist", "train")
    counts = torch.bincount(train.labels, minlength=10).tolist()
    aux = ft.aux_ood_dataset(a.aux_n, channels=1, image_size=28, seed=0)
    pre_dir = os.path.join(a.work, f"sep-pretrain-s{seed}")
    pre_cfg = ft.FinetuneConfig.preset(
        "ce", epochs=a.pretrain_epochs, optimizer="sgd", lr=0.1, weight_decay=5e-4, seed=seed
    )
    torch.manual_seed(seed)
    t0 = time.time()
    pre = ft.finetune(small_cnn(10, 1, a.width), train, pre_cfg, out_dir=pre_dir, resume=True, progress=not a.quiet)
    pre_secs = time.time() - t0
    out = os.path.join(a.work, "results", f"sep-pretrained-ce-s{seed}.json")
    if not os.path.exists(out):
        r = evaluate_model(pre.model, counts, cache)
        r.update(track="sep", row="pretrained CE", seed=seed, config=pre_cfg.to_dict(), history=pre.history)
        r["train_seconds"] = pre_secs
        save(out, r)
    for row, method in SEP_METHOD.items():
        out = os.path.join(a.work, "results", f"sep-{slug(row)}-s{seed}.json")
        if os.path.exists(out):
            continue
        cfg = ft.FinetuneConfig.preset(
            method,
            epochs=a.finetune_epochs,
            batch_size=128,
            ood_batch_size=256,
            optimizer="sgd",
            lr=0.07,
            weight_decay=5e-4,
            seed=seed,
        )
        torch.manual_seed(seed)
        model = ft.load_finetuned(small_cnn(10, 1, a.width), pre_dir)
        t0 = time.time()
        res = ft.finetune(
            model,
            train,
            cfg,
            aux_ood=aux if cfg.uses_ood else None,
            out_dir=os.path.join(a.work, f"sep-{slug(row)}-s{seed}"),
            resume=True,
            progress=not a.quiet,
        )
        secs = time.time() - t0
        r = evaluate_model(res.model, counts, cache)
        r.update(track="sep", row=row, seed=seed, config=cfg.to_dict(), history=res.history, train_seconds=secs)
        save(out, r)
        print(f"[sep] {row} seed {seed}: acc {r['accuracy']['overall']:.4f} ({secs:.0f}s)", flush=True)


def save(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# report


def ms(vals: list[float], scale: float = 100.0, digits: int = 1) -> str:
    a = np.asarray(vals, dtype=np.float64) * scale
    a = a[~np.isnan(a)]
    if a.size == 0:
        return "-"
    if a.size == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}"


def load_results(work: str) -> list[dict]:
    d = os.path.join(work, "results")
    return [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d)) if f.endswith(".json")]


def report(a) -> None:
    res = load_results(a.work)
    lines: list[str] = []
    for track, rows, scores in (
        ("lt", list(LT_ROWS), {"LA-CE": ["msp", "energy"], "LA-CE+OE": ["msp", "energy"]}),
        ("sep", SEP_ROWS, {"Separation": ["separation", "msp", "energy"]}),
    ):
        rr = [r for r in res if r["track"] == track]
        if not rr:
            continue
        sets = rr[0]["ood_sets"]
        seeds = sorted({r["seed"] for r in rr})
        title = "Fashion-MNIST-LT (rho = 0.01)" if track == "lt" else "Fashion-MNIST (balanced)"
        lines.append(f"### {title}: seeds {seeds}, mean ± std over seeds, all numbers in %\n")
        head = "| method | score | ACC |" + (" many | medium | few |" if track == "lt" else "")
        head += " AUROC (mean) | FPR95 (mean) |"
        lines.append(head)
        lines.append("|" + "---|" * (head.count("|") - 1))
        per_set: list[str] = []
        for row in rows:
            runs = [r for r in rr if r["row"] == row]
            if not runs:
                continue
            default = ["penultimate_norm", "msp", "energy"] if row.startswith("RNA") else ["msp", "energy"]
            if track == "sep" and row != "Separation":
                default = ["msp", "energy", "separation"]
            label = row if len(runs) == len(seeds) else f"{row} (n={len(runs)})"
            for det in scores.get(row, default):
                acc = [r["accuracy"] for r in runs]
                cells = [label, f"`{det}`", ms([x["overall"] for x in acc])]
                if track == "lt":
                    cells += [ms([x[g] for x in acc]) for g in ("many", "medium", "few")]
                cells += [
                    ms([r["ood"][det]["mean"]["auroc"] for r in runs]),
                    ms([r["ood"][det]["mean"]["fpr95"] for r in runs]),
                ]
                lines.append("| " + " | ".join(cells) + " |")
                per_set.append(
                    "| "
                    + " | ".join(
                        [label, f"`{det}`"]
                        + [
                            f"{ms([r['ood'][det][s]['auroc'] for r in runs])} / {ms([r['ood'][det][s]['fpr95'] for r in runs])}"
                            for s in sets
                        ]
                    )
                    + " |"
                )
        lines.append("")
        lines.append("Per OOD set, AUROC / FPR95 (ID positive):\n")
        h2 = "| method | score | " + " | ".join(sets) + " |"
        lines += [h2, "|" + "---|" * (h2.count("|") - 1), *per_set, ""]
        secs = {row: [r["train_seconds"] for r in rr if r["row"] == row] for row in rows}
        lines.append(
            "Training time per run (s, this machine): "
            + ", ".join(f"{k} {np.mean(v):.0f}" for k, v in secs.items() if v)
            + "\n"
        )
    text = "\n".join(lines)
    print(text)
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "history"} | {"final_epoch": r["history"][-1]} for r in res]
        meta = {
            "command": " ".join(sys.argv),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        }
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "runs": slim}, f, indent=1)


@torch.no_grad()
def norms(a) -> None:
    """Median penultimate norm ||z|| per set for every finished run of ``--seed`` (diagnostic)."""
    cache: dict = {"id": get_dataset("fashion-mnist", "test"), "ood": ood_sets()}
    sets = {"fashion-mnist (ID)": cache["id"], **cache["ood"], "aux OOD (train)": ft.aux_ood_dataset(a.aux_n)}
    rows = [(f"lt-{slug(r)}", r) for r in LT_ROWS] + [("sep-pretrain", "pretrained CE")]
    rows += [(f"sep-{slug(r)}", r) for r in SEP_METHOD]
    print(f"Median ||z|| (penultimate norm), seed {a.seed}\n")
    print("| run | " + " | ".join(sets) + " |")
    print("|" + "---|" * (len(sets) + 1))
    for stem, label in rows:
        run = os.path.join(a.work, f"{stem}-s{a.seed}")
        if not os.path.exists(os.path.join(run, "model.json")):
            continue
        model = ft.load_finetuned(small_cnn(10, 1, a.width), run)
        cells = []
        for ds in sets.values():
            meds = []
            for x, _ in torch.utils.data.DataLoader(ds, batch_size=1000):
                feats = capture(get_adapter(model), x, CaptureSpec(logits=False, penultimate=True))
                meds.append(feats["penultimate"].norm(dim=1))
            cells.append(f"{torch.cat(meds).median().item():.1f}")
        track = "LT" if stem.startswith("lt") else "balanced"
        print(f"| {label} ({track}) | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--track", choices=["lt", "sep"], required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--epochs", type=int, default=10, help="LT track epochs")
    r.add_argument("--pretrain-epochs", type=int, default=2)
    r.add_argument("--finetune-epochs", type=int, default=2)
    r.add_argument("--rho", type=float, default=0.01)
    r.add_argument("--width", type=int, default=16)
    r.add_argument("--aux-n", type=int, default=20000)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--quiet", action="store_true")
    n = sub.add_parser("norms")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--width", type=int, default=16)
    n.add_argument("--aux-n", type=int, default=20000)
    for q in (r, sub.add_parser("report"), n):
        q.add_argument("--work", default="runs/finetune-bench")
    sub.choices["report"].add_argument("--json", default=None)
    a = p.parse_args()
    if a.cmd == "report":
        report(a)
        return
    if a.cmd == "norms":
        torch.set_num_threads(1)
        norms(a)
        return
    torch.set_num_threads(a.threads)
    cache: dict = {}
    for seed in a.seeds:
        (run_lt if a.track == "lt" else run_sep)(a, seed, cache)


if __name__ == "__main__":
    main()
