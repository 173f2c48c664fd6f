"""More local data sets: crops of textures and photos, OpenCV digits, synthetic noise, the
corrupted Fashion-MNIST test set and ``imagefolder:PATH``.

Crop sets (``textures``, ``photos``, ``opencv-photos``) store a fixed list of square boxes
(source image, top, left, side), drawn once with seed 0; a sample is its box cut from the
source and resized with PIL (antialiased bilinear) straight to the requested ``image_size``
(default 64), so each model gets the crops at its own input resolution.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, MissingResourceError
from ..files import atomic_write
from .registry import (
    OPENCV_DATA_DIR,
    DatasetInfo,
    FileSource,
    ImageSource,
    _as_size,
    _fashion_mnist,
    _need_file,
    cache_dir,
    package_dir,
    pil_to_tensor,
    register_dataset,
    register_dataset_prefix,
)

__all__ = [
    "FMNIST_C_CORRUPTIONS",
    "OPENCV_PHOTOS",
    "PHOTO_SOURCES",
    "CropSource",
    "NoiseSource",
    "imagefolder_info",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# ---------------------------------------------------------------------------------------------
# crop sets


class CropSource(ImageSource):
    """Square crops ``boxes[j] = (source, top, left, side)`` of ``sources()``, resized to ``size``."""

    def __init__(
        self,
        name: str,
        sources: Callable[[], list[np.ndarray]],
        boxes: np.ndarray,
        *,
        channels: int | None,
        size: tuple[int, int],
    ) -> None:
        super().__init__(len(boxes))
        self.name = name
        self.sources = sources
        self.boxes = np.asarray(boxes, dtype=np.int64)
        self.channels = channels
        self.size = size

    def _make(self, j: int) -> torch.Tensor:
        from PIL import Image

        s, top, left, side = (int(v) for v in self.boxes[j])
        img = Image.fromarray(self.sources()[s][top : top + side, left : left + side])
        if img.size != (self.size[1], self.size[0]):
            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
        return pil_to_tensor(img, self.channels)

    def _describe(self) -> dict[str, Any]:
        return {
            "kind": "crops",
            "name": self.name,
            "boxes": hashlib.sha256(self.boxes.tobytes()).hexdigest(),
            "channels": self.channels,
            "size": self.size,
        }


def _square_boxes(
    shapes: Sequence[tuple[int, int]],
    per_source: int,
    side_fn: Callable[[np.random.Generator, int], int],
    seed: int,
    center_first: bool = True,
) -> np.ndarray:
    """``per_source`` square boxes per source, at uniform positions with sides from
    ``side_fn(rng, shorter side)``; with ``center_first`` the first box of each source is its
    central full square."""
    rng = np.random.default_rng(seed)
    out = []
    for s, (h, w) in enumerate(shapes):
        short = min(h, w)
        if center_first:
            out.append((s, (h - short) // 2, (w - short) // 2, short))
        for _ in range(per_source - int(center_first)):
            side = min(side_fn(rng, short), short)
            out.append((s, int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side))
    return np.asarray(out, dtype=np.int64)


def _to_uint8_rgb_or_gray(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


@functools.lru_cache(maxsize=1)
def _texture_sources() -> list[np.ndarray]:
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - scikit-image is in the data extra
        raise MissingResourceError("textures need scikit-image: pip install scikit-image") from e
    return [_to_uint8_rgb_or_gray(getattr(data, n)()) for n in ("brick", "grass", "gravel")]


def _textures(
    split: str, root: str | None, *, channels: int | None = None, image_size: int | tuple | None = None
) -> tuple[CropSource, None]:
    """700 random square crops (seed 0) of each of scikit-image's CC0 brick, grass and gravel
    textures (512 x 512 gray). The crop side is ``max(64, image_size)`` (at most 512), so small
    models see 64 px crops shrunk to their size and large models crops at full resolution."""
    size = _as_size(image_size) or (64, 64)
    side = min(512, max(64, *size))
    srcs = _texture_sources()
    boxes = _square_boxes([s.shape[:2] for s in srcs], 700, lambda rng, short: side, seed=0, center_first=False)
    return CropSource("textures", _texture_sources, boxes, channels=channels, size=size), None


#: the natural photos of the ``photos`` set (foolbox's 20 ImageNet samples are added)
PHOTO_SOURCES: tuple[str, ...] = (
    "skimage:astronaut",
    "skimage:chelsea",
    "skimage:coffee",
    "skimage:rocket",
    "skimage:stereo_motorcycle",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
    "foolbox:imagenet_*.jpg",
)


@functools.lru_cache(maxsize=1)
def _photo_sources() -> list[np.ndarray]:
    from PIL import Image

    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - scikit-image is in the data extra
        raise MissingResourceError("photos need scikit-image: pip install scikit-image") from e
    from sklearn.datasets import load_sample_images

    imgs = [_to_uint8_rgb_or_gray(getattr(data, n)()) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    imgs.append(_to_uint8_rgb_or_gray(data.stereo_motorcycle()[0]))
    sk = load_sample_images()
    by_name = {os.path.basename(f): im for f, im in zip(sk.filenames, sk.images)}
    imgs += [_to_uint8_rgb_or_gray(by_name[n]) for n in ("china.jpg", "flower.jpg")]
    d = os.path.join(package_dir("foolbox", "pip install --no-deps foolbox==3.3.4"), "data")
    files = sorted(glob.glob(os.path.join(d, "imagenet_*.jpg")))
    if len(files) != 20:
        raise MissingResourceError(
            f"expected foolbox's 20 ImageNet samples {d}/imagenet_*.jpg, found {len(files)}. "
            "Reinstall: pip install --no-deps foolbox==3.3.4"
        )
    for f in files:
        with Image.open(f) as im:
            imgs.append(np.asarray(im.convert("RGB")))
    return imgs


def _photo_side(rng: np.random.Generator, short: int) -> int:
    return round(short * rng.uniform(0.35, 1.0))


def _photos(
    split: str, root: str | None, *, channels: int | None = None, image_size: int | tuple | None = None
) -> tuple[CropSource, None]:
    """27 natural photos x 40 square crops (the central full square + 39 random crops whose side
    is 35-100 % of the shorter side; seed 0) = 1,080 images, resized to ``image_size``."""
    srcs = _photo_sources()
    boxes = _square_boxes([s.shape[:2] for s in srcs], 40, _photo_side, seed=0)
    size = _as_size(image_size) or (64, 64)
    return CropSource("photos", _photo_sources, boxes, channels=channels, size=size), None


#: natural photos from OpenCV's sample data (duplicates, renders, drawings, logos, documents
#: and calibration patterns left out)
OPENCV_PHOTOS: tuple[str, ...] = (
    "aero1.jpg",
    "aero3.jpg",
    "aloeL.jpg",
    "apple.jpg",
    "baboon.jpg",
    "basketball1.png",
    "board.jpg",
    "box_in_scene.png",
    "building.jpg",
    "butterfly.jpg",
    "chicky_512.png",
    "ela_original.jpg",
    "fruits.jpg",
    "graf1.png",
    "home.jpg",
    "leuvenA.jpg",
    "licenseplate_motion.jpg",
    "messi5.jpg",
    "orange.jpg",
    "rubberwhale1.png",
    "squirrel_cls.jpg",
    "starry_night.jpg",
    "stuff.jpg",
    "sudoku.png",
)

_OPENCV_HINT = (
    "OpenCV's sample data comes from the Debian package 'opencv-doc' (apt-get install opencv-doc), "
    f"which puts it in {OPENCV_DATA_DIR}; or pass data_root= a folder holding those files."
)


@functools.lru_cache(maxsize=4)
def _opencv_photo_sources(root: str) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for n in OPENCV_PHOTOS:
        with Image.open(_need_file(os.path.join(root, n), _OPENCV_HINT)) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def _opencv_photos(
    split: str, root: str | None, *, channels: int | None = None, image_size: int | tuple | None = None
) -> tuple[CropSource, None]:
    """24 natural photos of OpenCV's sample data x 40 crops (as ``photos``) = 960 images."""
    d = root or OPENCV_DATA_DIR
    srcs = _opencv_photo_sources(d)
    boxes = _square_boxes([s.shape[:2] for s in srcs], 40, _photo_side, seed=0)
    size = _as_size(image_size) or (64, 64)
    return (
        CropSource("opencv-photos", functools.partial(_opencv_photo_sources, d), boxes, channels=channels, size=size),
        None,
    )


def _opencv_digits(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's ``digits.png``: 5,000 handwritten digits (20 x 20, white on black, 500 per class,
    in class order), padded by 4 px to 28 x 28 like MNIST."""
    from PIL import Image

    path = _need_file(os.path.join(root or OPENCV_DATA_DIR, "digits.png"), _OPENCV_HINT)
    with Image.open(path) as im:
        a = np.asarray(im.convert("L"))
    if a.shape != (1000, 2000):
        raise MissingResourceError(f"{path} has shape {a.shape}, expected (1000, 2000); reinstall opencv-doc.")
    cells = a.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
    return np.pad(cells, ((0, 0), (4, 4), (4, 4))), np.repeat(np.arange(10, dtype=np.int64), 500)


# ---------------------------------------------------------------------------------------------
# noise


class NoiseSource(ImageSource):
    """``n`` noise images generated per index at the requested size and channel count: the first
    half uniform on [0, 1], the second half Gaussian (mean 0.5, std 0.25, clipped); channels
    are independent. Image ``j`` depends only on ``(seed, j)``."""

    def __init__(self, n: int, channels: int, size: tuple[int, int], seed: int = 0) -> None:
        super().__init__(n)
        self.n, self.channels, self.size, self.seed = n, channels, size, seed

    def _make(self, j: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, j])
        shape = (self.channels, *self.size)
        if j < self.n // 2:
            a = rng.uniform(0.0, 1.0, shape)
        else:
            a = np.clip(rng.normal(0.5, 0.25, shape), 0.0, 1.0)
        return torch.from_numpy(a.astype(np.float32))

    def _describe(self) -> dict[str, Any]:
        return {"kind": "noise", "n": self.n, "channels": self.channels, "size": self.size, "seed": self.seed}


def _noise(
    split: str, root: str | None, *, channels: int | None = None, image_size: int | tuple | None = None
) -> tuple[NoiseSource, None]:
    return NoiseSource(2000, channels or 1, _as_size(image_size) or (28, 28)), None


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST-C: covariate shift

#: the 16 imagecorruptions corruptions that work with numpy 2 / scikit-image >= 0.19
#: (glass_blur and gaussian_blur pass a removed ``multichannel`` argument, fog uses ``np.float_``)
FMNIST_C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "spatter",
    "saturate",
)
_FMNIST_C_VERSION = 1  # bump when the generation below changes (invalidates the disk cache)


def _fmnist_c_splits() -> tuple[str, ...]:
    out = ["test", *(f"s{s}" for s in range(1, 6))]
    for c in FMNIST_C_CORRUPTIONS:
        out += [c, *(f"{c}-{s}" for s in range(1, 6))]
    return tuple(out)


def _parse_fmnist_c_split(split: str) -> tuple[tuple[str, ...], int]:
    if split == "test":
        return FMNIST_C_CORRUPTIONS, 3
    if split[0] == "s" and split[1:].isdigit():
        return FMNIST_C_CORRUPTIONS, int(split[1:])
    name, _, sev = split.rpartition("-")
    if name in FMNIST_C_CORRUPTIONS and sev.isdigit():
        return (name,), int(sev)
    return (split,), 3


def _corrupt_fmnist(x: np.ndarray, corruptions: Sequence[str], severity: int) -> np.ndarray:
    """Corrupt 28 x 28 gray images: resize to 32 (the library's minimum), replicate to RGB,
    corrupt image ``i`` with ``corruptions[i % len]`` (numpy's global RNG seeded with ``i`` and
    restored afterwards), keep the first channel, resize back to 28 (PIL bilinear)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from imagecorruptions import corrupt
    except ImportError as e:
        raise MissingResourceError(
            'fashion-mnist-c needs imagecorruptions: pip install imagecorruptions "setuptools<81" '
            "(part of normscore's data extra: pip install normscore[data])"
        ) from e
    from PIL import Image

    from ..progress import progress_bar

    out = np.empty_like(x)
    state = np.random.get_state()
    bar = progress_bar(total=len(x), desc=f"fashion-mnist-c s{severity}", unit="img")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(len(x)):
                np.random.seed(i)
                x32 = np.asarray(Image.fromarray(x[i]).resize((32, 32), Image.BILINEAR))
                y = np.asarray(
                    corrupt(
                        np.stack([x32] * 3, -1), corruption_name=corruptions[i % len(corruptions)], severity=severity
                    )
                )
                y = np.clip(y[..., 0] if y.ndim == 3 else y, 0, 255).astype(np.uint8)
                out[i] = np.asarray(Image.fromarray(y).resize((28, 28), Image.BILINEAR))
                if i % 256 == 255:
                    bar.update(256)
    finally:
        np.random.set_state(state)
        bar.close()
    return out


def _fashion_mnist_c(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST test set under imagecorruptions shifts (labels kept). Splits: ``test``
    (the 16 corruptions in turn over the 10,000 images, severity 3), ``s1``..``s5`` (the same
    at severity 1-5), ``<corruption>`` (one corruption, severity 3) and ``<corruption>-<s>``.
    Generated once (about 10-40 s) and cached as ``.npy`` under ``cache_dir('data')``."""
    corruptions, severity = _parse_fmnist_c_split(split)
    if not 1 <= severity <= 5 or any(c not in FMNIST_C_CORRUPTIONS for c in corruptions):
        raise ConfigError(f"fashion-mnist-c: bad split {split!r}")
    x, y = _fashion_mnist("test", root)
    key = hashlib.sha256(
        repr((_FMNIST_C_VERSION, corruptions, severity, hashlib.sha256(x.tobytes()).hexdigest())).encode()
    ).hexdigest()[:16]
    path = os.path.join(cache_dir("data", "fashion-mnist-c"), f"{split}-{key}.npy")
    if os.path.exists(path):
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == x.shape and arr.dtype == np.uint8:
                return arr, y
        except (OSError, ValueError):
            pass  # a damaged cache file: regenerate it
    arr = _corrupt_fmnist(x, corruptions, severity)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
    return arr, y


# ---------------------------------------------------------------------------------------------
# imagefolder:PATH


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted, hidden entries skipped)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f) and not f.startswith(".")]
    return out


def has_image_file(folder: str) -> bool:
    """Whether ``folder`` holds an image file (recursive; stops at the first one found)."""
    for _dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(_is_image(f) and not f.startswith(".") for f in filenames):
            return True
    return False


def class_folder_names(root: str) -> list[str]:
    """Sorted class sub-folder names of ``root`` (without listing their files)."""
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def class_folder_listing(
    root: str, classes: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    """``(paths, labels, class_names)`` of an ImageFolder tree ``root/<class>/**/<image>``.

    Without class sub-folders, the images under ``root`` are returned unlabelled (``labels``
    ``None``). ``classes`` fixes the class order (e.g. the train split's); a sub-folder that is
    not among them is an error.
    """
    subdirs = class_folder_names(root)
    if not subdirs:
        paths = list_image_files(root)
        return paths, None, None
    names = list(classes) if classes is not None else subdirs
    index = {c: i for i, c in enumerate(names)}
    unknown = [d for d in subdirs if d not in index]
    if unknown:
        raise ConfigError(f"{root}: class folders {unknown[:5]} are not among the {len(names)} training classes.")
    paths, labels = [], []
    for d in subdirs:
        files = list_image_files(os.path.join(root, d))
        paths += files
        labels += [index[d]] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), names


class _FolderFiles(FileSource):
    """A :class:`FileSource` that also carries the class names."""

    class_names: list[str] | None = None


def _folder_source(
    paths: list[str],
    class_names: list[str] | None,
    *,
    channels: int | None,
    image_size: int | tuple | None,
    crop_pct: float | None,
    interpolation: str,
) -> _FolderFiles:
    src = _FolderFiles(paths, channels=channels, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation)
    src.class_names = class_names
    return src


_FOLDER_LAYOUT = (
    "Expected PATH/<class>/<image> (one split, 'test'), PATH/{train,val,test}/<class>/<image> "
    "(those splits), or a folder of images without classes (unlabelled)."
)


def imagefolder_info(path: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``imagefolder:PATH``."""
    root = os.path.abspath(os.path.expanduser(path))
    if not path or not os.path.isdir(root):
        raise MissingResourceError(f"imagefolder:{path}: {root} is not a folder. {_FOLDER_LAYOUT}")
    splits = tuple(s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s)))
    if not splits:
        splits = ("test",)

    def folder(split: str) -> str:
        sub = os.path.join(root, split)
        return sub if os.path.isdir(sub) else root

    def loader(
        split: str,
        data_root: str | None,
        *,
        channels: int | None = None,
        image_size: int | tuple | None = None,
        crop_pct: float | None = None,
        interpolation: str = "bilinear",
    ) -> tuple[_FolderFiles, np.ndarray | None]:
        classes = None
        if split != "train" and "train" in splits:
            classes = class_folder_names(os.path.join(root, "train")) or None
        paths, labels, names = class_folder_listing(folder(split), classes)
        if not paths:
            raise MissingResourceError(
                f"imagefolder:{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder(split)}. {_FOLDER_LAYOUT}"
            )
        src = _folder_source(
            paths, names, channels=channels, image_size=image_size, crop_pct=crop_pct, interpolation=interpolation
        )
        return src, labels

    def check(split: str, data_root: str | None) -> None:
        if not has_image_file(folder(split)):
            raise MissingResourceError(
                f"imagefolder:{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder(split)}. {_FOLDER_LAYOUT}"
            )

    n_classes = len(class_folder_names(folder(splits[0]))) or None
    return DatasetInfo(
        name=f"imagefolder:{path}",
        loader=loader,
        splits=splits,
        description=f"image files under {root} ({', '.join(splits)})",
        provider="a local folder",
        num_classes=n_classes,
        formats=True,
        native_channels=None,
        files=True,
        check=check,
    )


# ---------------------------------------------------------------------------------------------
# registration

register_dataset(
    "textures",
    _textures,
    description="2,100 random square crops (64 px, or the model's size) of scikit-image's brick, grass and gravel (CC0)",
    provider="pip install scikit-image",
    formats=True,
    native_size=64,
    native_channels=1,
)
register_dataset(
    "noise",
    _noise,
    description="2,000 noise images at the requested size/channels (default 28x28 gray): 1,000 uniform, 1,000 Gaussian (mean 0.5, std 0.25)",
    provider="synthetic",
    formats=True,
    native_size=28,
    native_channels=1,
)
register_dataset(
    "photos",
    _photos,
    description="1,080 square crops of 27 natural photos (scikit-image astronaut/chelsea/coffee/rocket/stereo_motorcycle, scikit-learn china/flower, foolbox's 20 ImageNet samples)",
    provider="pip install scikit-image; pip install --no-deps foolbox",
    formats=True,
    native_size=64,
    native_channels=3,
)
register_dataset(
    "opencv-photos",
    _opencv_photos,
    description="960 square crops of 24 natural photos from OpenCV's sample data",
    provider="apt-get install opencv-doc",
    formats=True,
    native_size=64,
    native_channels=3,
)
register_dataset(
    "opencv-digits",
    _opencv_digits,
    description="5,000 handwritten digits (OpenCV's digits.png, 20x20 padded to 28x28, white on black)",
    provider="apt-get install opencv-doc",
    num_classes=10,
    native_size=28,
    native_channels=1,
)
register_dataset(
    "fashion-mnist-c",
    _fashion_mnist_c,
    splits=_fmnist_c_splits(),
    description="the Fashion-MNIST test set under 16 imagecorruptions shifts (covariate shift; labels kept)",
    provider='apt-get install dataset-fashion-mnist; pip install imagecorruptions "setuptools<81"',
    num_classes=10,
    native_size=28,
    native_channels=1,
)
register_dataset_prefix(
    "imagefolder",
    imagefolder_info,
    "any folder of images: PATH/<class>/<image> or PATH/{train,val,test}/<class>/<image>",
)
