"""Is the main job reproducible? Run ``normscore-bench`` cold (each run with its own empty cache)
under several settings and compare the trained model files and ``results.csv`` bit for bit.

Variants (``--variants``, comma-separated; the first is the reference):

* ``threads2`` - ``--threads 2`` (the default on a 2-core machine);
* ``threads1`` - ``--threads 1``;
* ``avx2`` - ``--threads 2`` with torch's, oneDNN's and MKL's kernels limited to AVX2
  (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``):
  what an older CPU would run, to measure what differs across CPU types.

Usage::

    python benchmarks/reproducibility.py --out /tmp/repro [--variants threads2,threads1,avx2] [-- BENCH ARGS]

``--kernels`` trains one epoch on 6,000 images in a fresh process per setting (the default
kernels, then each library limited to AVX2 alone, then all three) and prints the largest weight
difference to the default: which library's instruction-set choice changes the training.

``--cost`` instead times ``train_classifier`` for one epoch of the main job's recipe on 20,000
Fashion-MNIST images with ``deterministic=True`` (one thread) and ``False`` (the current threads),
alternating, and prints the ratio: what reproducibility costs.

Prints per variant the wall time, the ID accuracy, whether the model file and results.csv equal
the reference's, the largest weight difference and the largest AUROC / fpr95 difference in
percentage points. Run it alone on the machine if the wall times matter.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import torch

VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "threads2": (["--threads", "2"], {}),
    "threads1": (["--threads", "1"], {}),
    "avx2": (
        ["--threads", "2"],
        {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    ),
}


def _bench() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "normscore-bench")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "normscore.bench.cli"]


def run_variant(name: str, out: str, extra: list[str]) -> dict:
    args, env = VARIANTS[name]
    vout, cache = os.path.join(out, name), os.path.join(out, f"cache-{name}")
    cmd = [*_bench(), *args, "--out", vout, "--cache-dir", cache, "--quiet", "--no-plots", *extra]
    print(f"[{name}] {' '.join(cmd)}" + (f"  (env {env})" if env else ""), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise SystemExit(f"[{name}] normscore-bench failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(vout, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    with open(os.path.join(vout, "results.csv"), encoding="utf-8") as f:
        csv_text = f.read()
    ckpt = res["model"]["training"]["checkpoint"]
    return {
        "name": name,
        "wall": wall,
        "accuracy": res["id"]["accuracy"],
        "train_seconds": res["model"]["training"].get("seconds"),
        "model_bytes": open(ckpt, "rb").read(),
        "state": torch.load(ckpt, weights_only=True),
        "csv": csv_text,
        "rows": list(csv.DictReader(csv_text.splitlines())),
    }


def _max_diff(a: list[dict], b: list[dict], metric: str) -> float:
    worst = 0.0
    for ra, rb in zip(a, b):
        if ra[metric] and rb[metric]:
            worst = max(worst, abs(float(ra[metric]) - float(rb[metric])))
    return worst


def training_cost(images: int = 20000, repeats: int = 2) -> None:
    from normscore.bench.models import SMALLCNN_WIDTH
    from normscore.data import get_dataset
    from normscore.models import small_cnn
    from normscore.training import train_classifier

    data = get_dataset("fashion-mnist", "train", limit=images, seed=0)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for det in (True, False):
            torch.manual_seed(0)
            model = small_cnn(width=SMALLCNN_WIDTH)
            t0 = time.perf_counter()
            train_classifier(model, data, epochs=1, progress=False, deterministic=det)
            times[det].append(time.perf_counter() - t0)
    d, n = min(times[True]), min(times[False])
    print(f"train_classifier, 1 epoch of {images} images, smallcnn width {SMALLCNN_WIDTH}, best of {repeats}:")
    print(
        f"  deterministic=True (1 thread): {d:.1f} s; deterministic=False ({torch.get_num_threads()} threads): {n:.1f} s"
    )
    print(f"  cost of reproducibility: {d / n:.2f}x")


_KERNEL_SETTINGS = {
    "default": {},
    "torch (ATEN_CPU_CAPABILITY=avx2)": {"ATEN_CPU_CAPABILITY": "avx2"},
    "oneDNN (ONEDNN_MAX_CPU_ISA=AVX2)": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL (MKL_ENABLE_INSTRUCTIONS=AVX2)": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "all three": VARIANTS["avx2"][1],
}

_TRAIN_ONE = """
import sys, torch
from normscore.bench.models import SMALLCNN_WIDTH
from normscore.data import get_dataset
from normscore.models import small_cnn
from normscore.training import train_classifier
torch.manual_seed(0)
m = train_classifier(small_cnn(width=SMALLCNN_WIDTH), get_dataset("fashion-mnist", "train", limit=6000, seed=0),
                     epochs=1, progress=False)
torch.save({k: v.clone() for k, v in m.state_dict().items()}, sys.argv[1])
"""


def kernel_attribution(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    states = {}
    for name, env in _KERNEL_SETTINGS.items():
        path = os.path.join(out, f"kernels-{len(states)}.pt")
        subprocess.run([sys.executable, "-c", _TRAIN_ONE, path], env={**os.environ, **env}, check=True)
        states[name] = torch.load(path, weights_only=True)
    ref = states["default"]
    print("| kernels limited to AVX2 | weights equal to default | max weight diff |")
    print("|---|---|---:|")
    for name, sd in states.items():
        diff = max(float((sd[k].double() - ref[k].double()).abs().max()) for k in ref)
        print(f"| {name} | {'yes' if diff == 0 else 'no'} | {diff:.3g} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for the runs and their caches (must not exist)")
    ap.add_argument("--cost", action="store_true", help="time deterministic vs multi-threaded training instead")
    ap.add_argument(
        "--kernels", metavar="DIR", help="which library's kernel choice changes the training (files in DIR)"
    )
    ap.add_argument("--variants", default="threads2,threads1,avx2")
    ap.add_argument("bench_args", nargs="*", help="extra normscore-bench arguments (after --)")
    a = ap.parse_args(argv)
    if a.cost:
        training_cost()
        return 0
    if a.kernels:
        kernel_attribution(a.kernels)
        return 0
    if not a.out:
        ap.error("--out is required (or --cost)")
    if os.path.exists(a.out):
        raise SystemExit(f"{a.out} exists; give a new folder so that every run starts from an empty cache")
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    runs = [run_variant(n, a.out, a.bench_args) for n in names]
    ref = runs[0]
    print()
    print(
        "| variant | wall (s) | training (s) | ID acc (%) | model file | results.csv | max weight diff | max AUROC diff (pp) | max fpr95 diff (pp) |"
    )
    print("|---|---:|---:|---:|---|---|---:|---:|---:|")
    for r in runs:
        same_file = r["model_bytes"] == ref["model_bytes"]
        wdiff = max(float((r["state"][k].double() - ref["state"][k].double()).abs().max()) for k in ref["state"])
        print(
            f"| {r['name']} | {r['wall']:.0f} | {r['train_seconds']} | {100 * r['accuracy']:.2f} | "
            f"{'identical' if same_file else 'differs'} | {'identical' if r['csv'] == ref['csv'] else 'differs'} | "
            f"{wdiff:.3g} | {_max_diff(r['rows'], ref['rows'], 'auroc'):.2f} | {_max_diff(r['rows'], ref['rows'], 'fpr95'):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
