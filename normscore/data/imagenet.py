"""ImageNet-1k with the OpenOOD v1.5 OOD sets, read from a local folder (``data_root``).

``get_dataset("imagenet", split, data_root=ROOT)``; splits:

* ``train``, ``val`` - the ImageNet training and validation images (``val`` is the ID test set);
* ``ssb_hard``, ``ninco`` (near-OOD) and ``inaturalist``, ``textures``, ``openimage_o``
  (far-OOD) - OpenOOD v1.5's test OOD sets for ImageNet-1k;
* ``openimage_o_val`` - OpenOOD v1.5's validation OOD set (OpenImage-O images disjoint from the
  test ones), used for hyperparameter search.

Each split is read from the first of these that exists under ``ROOT``:

1. an ImageFolder tree: ``ROOT/train/<wnid>/*.JPEG``, ``ROOT/val/<wnid>/*.JPEG`` (class
   sub-folders, sorted wnids give the standard class indices); OOD sets as plain folders of
   images ``ROOT/ood/<name>/**`` (or ``ROOT/<name>/**``);
2. OpenOOD's own layout: the image lists ``ROOT/benchmark_imglist/imagenet/<list>.txt``
   (lines ``relative/path label``; ``train_imagenet.txt``, ``test_imagenet.txt`` for ``val``,
   ``test_<name>.txt``, ``val_openimage_o.txt``) with paths relative to
   ``ROOT/images_largescale/`` (``ROOT/images_classic/`` for textures), as OpenOOD's download
   script leaves them.

``ROOT`` defaults to ``$NORMSCORE_IMAGENET_ROOT``. Nothing is downloaded; a missing split is an
error that names the paths it looked for.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import MissingResourceError
from .registry import register_dataset
from .sets import (
    _folder_source,
    _FolderFiles,
    class_folder_listing,
    class_folder_names,
    has_image_file,
    list_image_files,
)

__all__ = ["IMAGENET_FAR", "IMAGENET_NEAR", "IMAGENET_OOD", "IMAGENET_VAL_OOD", "imagenet_root"]

IMAGENET_NEAR: tuple[str, ...] = ("ssb_hard", "ninco")
IMAGENET_FAR: tuple[str, ...] = ("inaturalist", "textures", "openimage_o")
IMAGENET_OOD: tuple[str, ...] = IMAGENET_NEAR + IMAGENET_FAR
IMAGENET_VAL_OOD = "openimage_o_val"

_LISTS = {
    "train": "train_imagenet.txt",
    "val": "test_imagenet.txt",
    **{n: f"test_{n}.txt" for n in IMAGENET_OOD},
    IMAGENET_VAL_OOD: "val_openimage_o.txt",
}

LAYOUT = """\
Expected layout under the data root (--data-root / data_root= / $NORMSCORE_IMAGENET_ROOT), either
  ROOT/train/<wnid>/<image>          ImageNet-1k training images, one folder per class
  ROOT/val/<wnid>/<image>            ImageNet-1k validation images, same class folders
  ROOT/ood/<name>/<images...>        OOD sets: ssb_hard, ninco, inaturalist, textures, openimage_o,
                                     openimage_o_val (validation OOD)
or OpenOOD v1.5's layout
  ROOT/benchmark_imglist/imagenet/{train_imagenet,test_imagenet,test_ssb_hard,test_ninco,
      test_inaturalist,test_textures,test_openimage_o,val_openimage_o}.txt
  ROOT/images_largescale/...   ROOT/images_classic/...   (the images those lists name)"""


def imagenet_root(data_root: str | None) -> str:
    """The ImageNet data root: ``data_root`` or ``$NORMSCORE_IMAGENET_ROOT``."""
    root = data_root or os.environ.get("NORMSCORE_IMAGENET_ROOT")
    if not root:
        raise MissingResourceError(
            "imagenet needs a local copy: pass --data-root DIR (data_root=DIR) or set "
            f"NORMSCORE_IMAGENET_ROOT. normscore never downloads data.\n{LAYOUT}"
        )
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise MissingResourceError(f"imagenet data root {root} is not a folder.\n{LAYOUT}")
    return root


def _read_list(root: str, list_path: str, split: str) -> tuple[list[str], np.ndarray]:
    rels, labels = [], []
    with open(list_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rel, _, lab = line.rpartition(" ")
            if not rel:
                rel, lab = lab, "-1"
            rels.append(rel)
            labels.append(int(lab) if lab.lstrip("-").isdigit() else -1)
    if not rels:
        raise MissingResourceError(f"imagenet:{split}: the image list {list_path} is empty.")
    bases = [os.path.join(root, "images_largescale"), os.path.join(root, "images_classic"), root]
    for base in bases:
        if os.path.isfile(os.path.join(base, rels[0])) and os.path.isfile(os.path.join(base, rels[-1])):
            return [os.path.join(base, r) for r in rels], np.asarray(labels, dtype=np.int64)
    tried = ", ".join(os.path.join(b, rels[0]) for b in bases)
    raise MissingResourceError(
        f"imagenet:{split}: the image list {list_path} names {rels[0]!r}, but no such file exists "
        f"(looked at {tried}).\n{LAYOUT}"
    )


def _train_classes(root: str) -> list[str] | None:
    d = os.path.join(root, "train")
    return (class_folder_names(d) or None) if os.path.isdir(d) else None


def _folder_problem(folder: str, split: str, paths: list[str], labelled: bool) -> str | None:
    """What is wrong with the image folder of ``split`` (``None``: usable)."""
    if not paths:
        subdirs = class_folder_names(folder)
        what = f"is empty (it has {len(subdirs)} sub-folders but no image files)" if subdirs else "is empty"
        return f"imagenet:{split}: {folder} {what}. Put the ImageNet {split} images there" + (
            " (one <wnid>/ folder per class)." if split in ("train", "val") else "."
        )
    if not labelled:
        return (
            f"imagenet:{split}: {folder} has {len(paths)} images but no class sub-folders; ImageNet "
            f"{split} images must be sorted into <wnid>/ folders (for the validation set, e.g. with "
            "the usual valprep.sh)."
        )
    return None


def _imagenet(
    split: str,
    data_root: str | None,
    *,
    channels: int | None = None,
    image_size: int | tuple | None = None,
    crop_pct: float | None = None,
    interpolation: str = "bilinear",
) -> tuple[_FolderFiles, np.ndarray | None]:
    root = imagenet_root(data_root)
    ood = split not in ("train", "val")
    folders = [os.path.join(root, "ood", split), os.path.join(root, split)] if ood else [os.path.join(root, split)]
    list_path = os.path.join(root, "benchmark_imglist", "imagenet", _LISTS[split])
    kw = {"channels": channels, "image_size": image_size, "crop_pct": crop_pct, "interpolation": interpolation}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        if ood:
            paths = list_image_files(folder)
            labels, names = None, None
        else:
            classes = _train_classes(root) if split == "val" else None
            paths, labels, names = class_folder_listing(folder, classes)
        if not paths and os.path.isfile(list_path):
            continue  # an empty folder next to OpenOOD's image list: read the list
        problem = _folder_problem(folder, split, paths, labels is not None or ood)
        if problem:
            raise MissingResourceError(f"{problem}\n{LAYOUT}")
        return _folder_source(paths, names, **kw), labels
    if os.path.isfile(list_path):
        paths, labels = _read_list(root, list_path, split)
        return _folder_source(paths, None, **kw), (None if ood else labels)
    looked = " or ".join([*folders, list_path])
    raise MissingResourceError(f"imagenet:{split}: not found - looked for {looked}.\n{LAYOUT}")


def _check(split: str, data_root: str | None) -> None:
    """Raise the error :func:`_imagenet` would raise for ``split``, without listing every file."""
    root = imagenet_root(data_root)
    ood = split not in ("train", "val")
    folders = [os.path.join(root, "ood", split), os.path.join(root, split)] if ood else [os.path.join(root, split)]
    list_path = os.path.join(root, "benchmark_imglist", "imagenet", _LISTS[split])
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        labelled = ood or bool(class_folder_names(folder))
        paths = ["?"] if (labelled and has_image_file(folder)) else ([] if labelled else list_image_files(folder))
        if not paths and os.path.isfile(list_path):
            break
        problem = _folder_problem(folder, split, paths, labelled)
        if problem:
            raise MissingResourceError(f"{problem}\n{LAYOUT}")
        return
    if os.path.isfile(list_path):
        return
    looked = " or ".join([*folders, list_path])
    raise MissingResourceError(f"imagenet:{split}: not found - looked for {looked}.\n{LAYOUT}")


register_dataset(
    "imagenet",
    _imagenet,
    check=_check,
    splits=("train", "val", *IMAGENET_OOD, IMAGENET_VAL_OOD),
    description="ImageNet-1k (local ImageFolder or OpenOOD v1.5 layout) with the OpenOOD v1.5 OOD sets as splits",
    provider="a local copy under --data-root (see normscore.data.imagenet.LAYOUT)",
    num_classes=1000,
    formats=True,
    native_channels=3,
    files=True,
)
