"""Benchmark suites: for an ID data set, its default model, splits and near/far/validation OOD sets.

``fashion-mnist`` (the embedded default):

* near-OOD - other 28 x 28 gray handwriting: ``mnist-5k``, ``opencv-digits``, ``sklearn-digits``;
* far-OOD - ``textures``, ``photos``, ``noise``;
* validation OOD (``--search``) - ``opencv-photos``: natural photos from OpenCV's sample data.
  Its source images appear in no test OOD set (``photos`` uses scikit-image, scikit-learn and
  foolbox images; the digit and texture sets are other sources altogether) nor in the
  fine-tuning module's auxiliary OOD set (other scikit-image images), so hyperparameters are
  never chosen on test data - the OpenOOD v1.5 rule. It is a generic natural-image set rather
  than a copy of either group, so it favours neither near nor far OOD by construction.

``imagenet`` (OpenOOD v1.5, ImageNet-1k): near ``ssb_hard``, ``ninco``; far ``inaturalist``,
``textures``, ``openimage_o``; validation OOD ``openimage_o_val`` (OpenOOD's own val-OOD list,
OpenImage-O images disjoint from its test images); default model ``efficientnet_lite0``.

For any other ID set the OOD sets must be given (``--ood``); the training split is ``train``
and the test split ``test`` (or ``val``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.imagenet import IMAGENET_FAR, IMAGENET_NEAR, IMAGENET_VAL_OOD

__all__ = ["SUITES", "Suite"]


@dataclass(frozen=True)
class Suite:
    """Defaults of one ID data set."""

    id: str
    train_split: str
    test_split: str
    near: tuple[str, ...]
    far: tuple[str, ...]
    val_ood: str | None
    val_ood_reason: str
    model: str
    train_epochs: int | None  # epochs when the default model must be trained here
    fit_size: int | None  # ID training images the cached detectors are fitted on (None: all)
    test_size: int | None  # cap on each test split, ID and OOD (None: all)
    live_fit_size: int | None  # ID training images the live detectors are fitted on (None: fit_size)


SUITES: dict[str, Suite] = {
    "fashion-mnist": Suite(
        id="fashion-mnist",
        train_split="train",
        test_split="test",
        near=("mnist-5k", "opencv-digits", "sklearn-digits"),
        far=("textures", "photos", "noise"),
        val_ood="opencv-photos",
        val_ood_reason=(
            "natural photos from OpenCV's sample data: no image in common with any test OOD set "
            "(photos = scikit-image/scikit-learn/foolbox images; digits and textures are other "
            "sources) nor with the fine-tuning auxiliary OOD set (other scikit-image images)"
        ),
        model="smallcnn",
        train_epochs=3,
        fit_size=10000,
        test_size=1000,
        live_fit_size=500,
    ),
    "imagenet": Suite(
        id="imagenet",
        train_split="train",
        test_split="val",
        near=IMAGENET_NEAR,
        far=IMAGENET_FAR,
        val_ood=IMAGENET_VAL_OOD,
        val_ood_reason=(
            "OpenOOD v1.5's validation OOD set for ImageNet-1k: OpenImage-O images disjoint from "
            "the test OpenImage-O images and from every other test OOD set"
        ),
        model="efficientnet_lite0",
        train_epochs=None,
        fit_size=50000,
        test_size=None,
        live_fit_size=10000,
    ),
}
