"""Does score fusion beat its best member? Fashion-MNIST track, small CNN, real OOD sets.

Model and data as ``benchmarks/zoo_fmnist.py`` (``small_cnn()`` trained 3 epochs, seed 0, on the
Fashion-MNIST training split; ``--checkpoint`` reuses or saves it). Every member is fitted on
its own with ``fit(model, loader)`` on ``--fit-samples`` training images (default 10,000, the
library's default calibration hold-out of every 10th image), and every fusion is fitted on the
same loader: its members see the same training rows and are normalised on the held-out rows.
ID test: ``--test-samples`` Fashion-MNIST test images; OOD: ``mnist-5k``, ``sklearn-digits``,
``textures``, ``noise`` (``--test-samples`` each, at most the set's size).

    python benchmarks/fusion_fmnist.py --checkpoint /work/devcache/smallcnn_fmnist_e3_s0.pt

prints, per member set and fusion method, AUROC / fpr95 (ID positive) per OOD set and the mean,
for the fusion and for each member, and whether the fusion beats the best member on the mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import normscore
from normscore.data import get_dataset
from normscore.metrics import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_fmnist import get_model  # noqa: E402

OOD_SETS = ["mnist-5k", "sklearn-digits", "textures", "noise"]
MEMBER_SETS = [
    ["msp", "energy", "penultimate_norm"],  # the fusion default
    ["energy", "mahalanobis", "knn"],
    ["mahalanobis", "vim", "knn"],
    ["energy", "featurenorm", "gradnorm"],
]


def scores_of(det, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([det.score(x[i : i + 500]) for i in range(0, len(x), 500)]) for k, x in xs.items()}


def metrics_of(s: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out = {}
    for o in OOD_SETS:
        m = evaluate(s["id"], s[o])
        out[o] = {"auroc": 100 * m["auroc"], "fpr95": 100 * m["fpr95"]}
    out["mean"] = {k: sum(out[o][k] for o in OOD_SETS) / len(OOD_SETS) for k in ("auroc", "fpr95")}
    return out


def cell(m: dict[str, float]) -> str:
    return f"{m['auroc']:.1f} / {m['fpr95']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--fit-samples", type=int, default=10_000)
    ap.add_argument("--test-samples", type=int, default=2_000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model, how = get_model(args.checkpoint, epochs=3, seed=0)
    fit_ds = get_dataset("fashion-mnist", "train", limit=args.fit_samples, seed=0)
    loader = torch.utils.data.DataLoader(fit_ds, batch_size=250)
    xs = {"id": get_dataset("fashion-mnist", "test", limit=args.test_samples, seed=0).tensors()[0]}
    for o in OOD_SETS:
        xs[o] = get_dataset(o, "test", channels=1, image_size=28, limit=args.test_samples, seed=0).tensors()[0]

    names = sorted({m for ms in MEMBER_SETS for m in ms})
    single = normscore.DetectorSet([normscore.create(n) for n in names]).fit(model, loader)
    member_metrics = {n: metrics_of(scores_of(single.detectors[n], xs)) for n in names}

    rows, lines = [], []
    head = "| members | method | " + " | ".join(OOD_SETS) + " | mean | best member (mean) | fusion - best |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for ms in MEMBER_SETS:
        best = max(ms, key=lambda n: member_metrics[n]["mean"]["auroc"])
        for method in ("ecdf", "zscore"):
            fused = normscore.create("fusion", members=ms, method=method).fit(model, loader)
            fm = metrics_of(scores_of(fused, xs))
            gain = fm["mean"]["auroc"] - member_metrics[best]["mean"]["auroc"]
            rows.append({"members": ms, "method": method, "fusion": fm, "best_member": best, "gain_auroc": gain})
            lines.append(
                f"| {', '.join(ms)} | {method} | "
                + " | ".join(cell(fm[o]) for o in OOD_SETS)
                + f" | **{cell(fm['mean'])}** | `{best}` {cell(member_metrics[best]['mean'])} | {gain:+.1f} |"
            )
    lines += ["", "Members alone (same fit rows):", ""]
    h2 = "| detector | " + " | ".join(OOD_SETS) + " | mean |"
    lines += [h2, "|" + "---|" * (h2.count("|") - 1)]
    for n in names:
        mm = member_metrics[n]
        lines.append(f"| `{n}` | " + " | ".join(cell(mm[o]) for o in OOD_SETS) + f" | {cell(mm['mean'])} |")
    print(f"model: {how}; AUROC / fpr95 in %, ID positive; {time.time() - t0:.0f} s\n")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"fusions": rows, "members": member_metrics}, indent=1))


if __name__ == "__main__":
    main()
