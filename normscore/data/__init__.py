"""Local dataset registry. Never downloads: every entry knows where its files live and which
package provides them, and says so when they are missing.

``get_dataset(name, split)`` returns a :class:`ImageSet` (a ``torch.utils.data.Dataset``)
whose items are ``(x, y)``: ``x`` a float32 tensor ``[C, H, W]`` in ``[0, 1]``, ``y`` an int64
class label (``-1`` for unlabelled OOD data). Pass ``channels`` / ``image_size`` to get images
in a model's format, ``limit`` to subsample deterministically (``seed``), ``indices`` to pick
rows, and ``transform`` for model-specific preprocessing (applied to the converted tensor,
e.g. the normalisation).

How images reach a requested format (``channels``, ``image_size``):

* **small fixed-size sets** held in memory (Fashion-MNIST, MNIST, digits, corrupted
  Fashion-MNIST): gray <-> RGB (RGB -> gray is the channel mean), then a plain bilinear
  (antialiased) resize of the whole image to ``image_size`` - no cropping, so nothing of the
  object is cut;
* **crop sets** made from large images (``textures``, ``photos``, ``opencv-photos``): every
  sample is a fixed square crop of a source image, resized once (PIL, antialiased) straight to
  ``image_size`` - a 224 px model sees crops at full resolution, not upsampled thumbnails;
* **synthetic sets** (``noise``) are generated directly at the requested size and channel
  count (RGB noise has independent channels);
* **image files** (``imagenet``, ``imagefolder:PATH``) are decoded lazily and, like timm's
  evaluation transform, the shorter side is resized to ``image_size / crop_pct`` and the
  centre ``image_size`` square cropped (``crop_pct`` 0.875 and ``image_size`` 224 by
  default).

``list_datasets()`` names every registered set; ``register_dataset`` adds your own and
``register_dataset_prefix`` a family of sets named ``prefix:argument`` (``imagefolder:PATH``).
"""

from . import imagenet, registry, sets  # noqa: F401 - imagenet and sets register the remaining sets
from .registry import (  # noqa: F401 - importable from normscore.data as before the registry moved
    DEFAULT_CROP_PCT,
    DEFAULT_FILE_SIZE,
    FASHION_MNIST_DIR,
    OPENCV_DATA_DIR,
    DatasetInfo,
    FileSource,
    ImageSet,
    ImageSource,
    cache_dir,
    check_dataset,
    dataset_info,
    get_dataset,
    list_dataset_prefixes,
    list_datasets,
    package_dir,
    pil_interpolation,
    pil_to_tensor,
    register_dataset,
    register_dataset_prefix,
    resize_center_crop,
)

__all__ = list(registry.__all__)  # the public names are the registry's
