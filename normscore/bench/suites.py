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

``fashion-mnist-effnet`` (``--suite fashion-mnist-effnet``): the ``fashion-mnist`` sets and sizes
with a real pretrained backbone - ``efficientnet_lite0`` (ImageNet weights, frozen) at 64 x 64 px
(the gray images replicated to 3 channels, the model's own normalisation), its classifier replaced
by a linear head for the 10 classes trained here on the backbone's pooled features of the 60,000
training images (:mod:`normscore.bench.probe`; cached like the trained ``smallcnn``).

For any other ID set the OOD sets must be given (``--ood``); the training split is ``train``
and the test split ``test`` (or ``val``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.imagenet import IMAGENET_FAR, IMAGENET_NEAR, IMAGENET_VAL_OOD

__all__ = ["SUITES", "Suite", "suite_names"]


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
    name: str | None = None  # the suite's name (``--suite``) when it is not its ID set's
    retrain: str | None = None  # "head": a new linear head on the frozen pretrained model (bench.probe)
    image_size: int | None = None  # input size of the suite's model (None: the model's or the data's)
    description: str = ""  # one line for --help and --list

    @property
    def key(self) -> str:
        """The suite's name: ``--suite KEY`` (``--id KEY`` for a suite named after its ID set)."""
        return self.name or self.id


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

_FM = SUITES["fashion-mnist"]
SUITES["fashion-mnist-effnet"] = Suite(
    id="fashion-mnist",
    train_split=_FM.train_split,
    test_split=_FM.test_split,
    near=_FM.near,
    far=_FM.far,
    val_ood=_FM.val_ood,
    val_ood_reason=_FM.val_ood_reason,
    model="efficientnet_lite0",
    train_epochs=10,  # epochs of the new linear head (on cached backbone features: seconds)
    fit_size=_FM.fit_size,
    test_size=_FM.test_size,
    live_fit_size=_FM.live_fit_size,
    name="fashion-mnist-effnet",
    retrain="head",
    image_size=64,
    description="ImageNet EfficientNet-Lite0, frozen, at 64 px with a new linear head trained on fashion-mnist",
)


def suite_names() -> list[str]:
    """The names ``--suite`` accepts."""
    return list(SUITES)
