"""More local datasets: texture crops and synthetic noise."""

from __future__ import annotations

import numpy as np

from . import register_dataset


def _textures(split: str, root: str | None, crop: int = 64, per_texture: int = 700) -> tuple[np.ndarray, None]:
    """Random ``crop`` x ``crop`` crops (seed 0) of scikit-image's CC0 brick, grass and gravel."""
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - scikit-image is in the data extra
        from ..errors import MissingResourceError

        raise MissingResourceError("textures need scikit-image: pip install scikit-image") from e
    rng = np.random.default_rng(0)
    out = []
    for name in ("brick", "grass", "gravel"):
        img = getattr(data, name)()
        r = rng.integers(0, img.shape[0] - crop + 1, per_texture)
        c = rng.integers(0, img.shape[1] - crop + 1, per_texture)
        out.extend(img[i : i + crop, j : j + crop] for i, j in zip(r, c))
    return np.stack(out), None


def _noise(split: str, root: str | None, n: int = 2000, size: int = 28) -> tuple[np.ndarray, None]:
    """Half uniform noise, half Gaussian noise (mean 0.5, std 0.25, clipped), gray, seed 0."""
    rng = np.random.default_rng(0)
    half = n // 2
    uni = rng.uniform(0, 1, (half, size, size))
    gau = np.clip(rng.normal(0.5, 0.25, (n - half, size, size)), 0, 1)
    return (np.concatenate([uni, gau]) * 255).round().astype(np.uint8), None


register_dataset(
    "textures",
    _textures,
    description="2,100 random 64x64 crops of scikit-image's brick, grass and gravel textures (CC0)",
    provider="pip install scikit-image",
)
register_dataset(
    "noise",
    _noise,
    description="2,000 gray 28x28 noise images: 1,000 uniform, 1,000 Gaussian (mean 0.5, std 0.25)",
    provider="synthetic",
)
