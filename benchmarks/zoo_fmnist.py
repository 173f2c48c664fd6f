"""Evidence for the detector zoo: every registered detector from ONE shared pass on Fashion-MNIST.

Model: ``normscore.models.small_cnn()`` trained with ``normscore.training.train_classifier`` on
the full Fashion-MNIST training split for 3 epochs, seed 0 (the defaults of this script; pass
``--checkpoint PATH`` to reuse a state dict trained with exactly that recipe - it is trained and
saved there when the file does not exist yet).

Fit: one ``normscore.DetectorSet`` of all registered detectors (or ``--detectors``) fitted in a
single shared pass over a fixed random subset of the training split: ``--fit-samples`` images
(default 20,000) drawn by ``get_dataset("fashion-mnist", "train", limit=..., seed=0)``, with
labels; every 10th of them is held out to calibrate the ``predict`` thresholds (not used by the
metrics below). Detectors whose defaults need more neighbours than a small bank holds are not
special-cased: the defaults are used everywhere.

Evaluation: the Fashion-MNIST test split (10,000 images) is ID; the OOD sets are ``mnist-5k``,
``sklearn-digits``, ``textures`` and ``noise``, loaded with ``channels=1, image_size=28``.
Metrics from ``normscore.evaluate``: AUROC and ``fpr95`` (ID positive: share of OOD accepted at
the threshold that keeps 95% of ID). Every batch is scored by ``DetectorSet.score`` (one forward
pass shared by all feature detectors; ODIN adds its own backward + forward pass).

    python benchmarks/zoo_fmnist.py --checkpoint /work/devcache/smallcnn_fmnist_e3_s0.pt --exclude ldg

prints the markdown table quoted in docs/methods-zoo.md (``--json`` also writes the numbers).
``--exclude ldg`` leaves out the LDG seed method, whose per-sample-gradient fit alone takes over
an hour on 20,000 images on two shared CPU cores; ``--detectors zoo`` runs only the 16 detectors
of the zoo.
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

import normscore
from normscore.data import get_dataset
from normscore.metrics import evaluate, mean_metrics
from normscore.models import small_cnn
from normscore.training import evaluate_accuracy, train_classifier

OOD_SETS = ["mnist-5k", "sklearn-digits", "textures", "noise"]
ZOO = [
    "entropy",
    "gen",
    "tempscale",
    "odin",
    "klm",
    "mahalanobis",
    "rmds",
    "knn",
    "vim",
    "react",
    "ash",
    "scale",
    "dice",
    "she",
    "nnguide",
    "fdbd",
]


def get_model(checkpoint: str | None, epochs: int, seed: int) -> tuple[torch.nn.Module, str]:
    model = small_cnn()
    if checkpoint and os.path.exists(checkpoint):
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        return model.eval(), f"loaded {checkpoint}"
    t = time.time()
    train_classifier(model, get_dataset("fashion-mnist", "train"), epochs=epochs, seed=seed, progress=False)
    how = f"trained from scratch ({epochs} epochs, seed {seed}, {time.time() - t:.0f} s)"
    if checkpoint:
        os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
        torch.save(model.state_dict(), checkpoint)
        how += f", saved to {checkpoint}"
    return model.eval(), how


def score_all(ds: normscore.DetectorSet, data, batch_size: int) -> dict[str, np.ndarray]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ds}
    for x, _ in torch.utils.data.DataLoader(data, batch_size=batch_size):
        for k, s in ds.score(x).items():
            out[k].append(s.detach().cpu())
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="state dict of small_cnn (trained and saved if missing)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-samples", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine is shared)")
    p.add_argument(
        "--detectors",
        nargs="*",
        default=["all"],
        help="'all' (every registered detector), 'zoo' (the 16 of issue 4) or names",
    )
    p.add_argument("--exclude", nargs="*", default=[], help="registered detectors to leave out")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    names: list[str] = []
    for d in a.detectors:
        names += normscore.list_detectors() if d == "all" else ZOO if d == "zoo" else [d]
    names = [n for n in dict.fromkeys(names) if n not in a.exclude]

    model, how = get_model(a.checkpoint, a.epochs, a.seed)
    test = get_dataset("fashion-mnist", "test")
    acc = evaluate_accuracy(model, test)
    fit_set = get_dataset("fashion-mnist", "train", limit=a.fit_samples, seed=0)
    loader = torch.utils.data.DataLoader(fit_set, batch_size=a.batch_size)

    ds = normscore.DetectorSet(names)
    t = time.time()
    ds.fit(model, loader)
    t_fit = time.time() - t

    t = time.time()
    s_id = score_all(ds, test, a.batch_size)
    n_scored = len(test)
    rows: dict[str, dict[str, dict[str, float]]] = {k: {} for k in ds}
    for o in OOD_SETS:
        data = get_dataset(o, "test", channels=1, image_size=28)
        n_scored += len(data)
        s_ood = score_all(ds, data, a.batch_size)
        for k in ds:
            rows[k][o] = evaluate(s_id[k], s_ood[k])
    t_score = time.time() - t
    for k in ds:
        rows[k]["mean"] = mean_metrics([rows[k][o] for o in OOD_SETS])

    cmd = "python benchmarks/zoo_fmnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: {cmd.strip()}")
    print(f"model: small_cnn, {how}; Fashion-MNIST test accuracy {acc:.4f}")
    print(
        f"fit: {len(names)} detectors, one DetectorSet pass over {len(fit_set)} training images "
        f"({t_fit:.1f} s); scoring {n_scored} images ({t_score:.1f} s); torch {torch.__version__}, "
        f"{a.threads} thread(s), {platform.processor() or platform.machine()}"
    )
    print()
    head = "| detector | " + " | ".join(f"{o} AUROC / FPR95" for o in [*OOD_SETS, "mean"]) + " |"
    print(head)
    print("|---" * (len(OOD_SETS) + 2) + "|")
    order = sorted(ds, key=lambda k: -rows[k]["mean"]["auroc"])
    for k in order:
        cells = [f"{100 * rows[k][o]['auroc']:.2f} / {100 * rows[k][o]['fpr95']:.2f}" for o in [*OOD_SETS, "mean"]]
        print(f"| `{k}` | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "command": cmd.strip(),
                    "model": how,
                    "accuracy": acc,
                    "fit_samples": len(fit_set),
                    "fit_seconds": t_fit,
                    "score_seconds": t_score,
                    "detectors": {k: ds[k].get_params() for k in ds},
                    "results": rows,
                },
                f,
                indent=1,
                default=str,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
