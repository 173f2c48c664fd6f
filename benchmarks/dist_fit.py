"""Fit detectors under torch.distributed (gloo, CPU) and compare with a single-process fit.

    python benchmarks/dist_fit.py --out DIR --single                       # reference fit
    torchrun --nproc_per_node=2 benchmarks/dist_fit.py --out DIR          # sharded fit
    python benchmarks/dist_fit.py --out DIR --compare                     # max abs/rel diffs

The dataset yields ``{"image", "label", "index"}``: with the dataset index, the calibration
hold-out and the seeded jigsaw views are the same samples in both runs, so the fitted states
must agree up to float rounding (statistics are float64 sums all-reduced over ranks).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import normscore
from normscore.io import loads
from normscore.models import small_cnn

#: hyperparameters for a fit on a few hundred images (every other detector at its defaults)
SMALL = {
    "vim": {"dim": 16},
    "knn": {"k": 5, "alpha": 0.5},
    "nnguide": {"k": 5, "alpha": 0.5},
    "ldg": {"n_components": 8},
}


def fitted_detectors() -> list[str]:
    """Every registered detector that has a fit (the ones a sharded fit can get wrong)."""
    return [n for n in normscore.list_detectors() if normscore.detector_class(n).needs_fit]


class Indexed(torch.utils.data.Dataset):
    def __init__(self, n: int = 384) -> None:
        try:
            from normscore.data import get_dataset

            ds = get_dataset("fashion-mnist", "train", limit=n, seed=0)
            self.x, self.y = ds.tensors()
        except Exception:  # noqa: BLE001 - any missing data: fall back to random images
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "index": i}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return small_cnn(width=8).eval()


def fit_all(out: Path, tag: str, loader, names: list[str]) -> None:
    m = model()
    for name in names:
        det = normscore.create(name, **SMALL.get(name, {})).fit(m, loader)
        if not dist.is_initialized() or dist.get_rank() == 0:
            det.save(out / f"{tag}-{name}.ns")


def compare(out: Path) -> dict:
    report = {}
    for name in normscore.list_detectors():
        a_p, b_p = out / f"single-{name}.ns", out / f"dist-{name}.ns"
        if not (a_p.exists() and b_p.exists()):
            continue
        _, a = loads(a_p.read_bytes())
        _, b = loads(b_p.read_bytes())
        worst_abs = worst_rel = 0.0

        def walk(x, y, path="", name=name):
            nonlocal worst_abs, worst_rel
            if isinstance(x, torch.Tensor):
                if x.dtype.is_floating_point:
                    diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
                    scale = x.double().abs().max().item() if x.numel() else 0.0
                    worst_abs = max(worst_abs, diff)
                    worst_rel = max(worst_rel, diff / max(scale, 1e-30))
                elif not torch.equal(x, y):
                    raise AssertionError(f"{name}: {path} differs")
            elif isinstance(x, dict):
                assert set(x) == set(y), (name, path, set(x) ^ set(y))
                for k in x:
                    walk(x[k], y[k], f"{path}/{k}", name)
            elif isinstance(x, list):
                assert len(x) == len(y), (name, path)
                for i, (u, v) in enumerate(zip(x, y)):
                    walk(u, v, f"{path}/{i}", name)
            elif isinstance(x, float):
                d = abs(x - y)
                worst_abs = max(worst_abs, d)
                worst_rel = max(worst_rel, d / max(abs(x), 1e-30))
            elif x != y and path.split("/")[-1] not in ("n_fit_samples_",):
                raise AssertionError(f"{name}: {path}: {x!r} != {y!r}")

        walk(a, b)
        report[name] = {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel}
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--single", action="store_true")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--detectors", default="all", help="comma-separated subset (default: every detector with a fit)")
    ap.add_argument("--samples", type=int, default=384, help="number of fit images")
    args = ap.parse_args()
    names = fitted_detectors() if args.detectors == "all" else args.detectors.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.compare:
        print(json.dumps(compare(out)))
        return
    ds = Indexed(args.samples)
    if args.single:
        fit_all(out, "single", torch.utils.data.DataLoader(ds, batch_size=64), names)
        return
    dist.init_process_group("gloo")
    sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=False)
    fit_all(out, "dist", torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler), names)
    dist.barrier()
    dist.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print("sharded fit saved")


if __name__ == "__main__":
    main()
