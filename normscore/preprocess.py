"""The model's own input preprocessing: image -> normalised tensor ``[C, H, W]``.

``score(x)`` takes a batch that is already preprocessed the way the model was trained (size,
crop, normalisation). :func:`input_transform` builds that preprocessing from what the model
knows about itself, so raw images can be scored::

    tf = normscore.input_transform(model)
    x = torch.stack([tf(img) for img in images])   # PIL images or uint8 numpy arrays [H, W(, C)]
    scores = det.score(x)

Sources, the first that applies:

1. ``weights=`` a torchvision weights enum member (or its name, e.g.
   ``"ResNet50_Weights.IMAGENET1K_V2"``): ``weights.transforms()``, torchvision's exact
   preprocessing for those weights (torchvision models do not record their weights);
2. a timm model (it carries ``pretrained_cfg``, also when created without pretrained weights):
   its data config (``timm.data.resolve_data_config`` -> ``timm.data.create_transform``);
3. any other model: the classic ImageNet evaluation transform: bilinear resize of the shorter
   side to ``size / 0.875``, centre crop ``size`` (224, or the model's ``image_size`` as in
   torchvision's ViTs), ImageNet mean and std.

Keyword overrides (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``,
``crop_mode``) replace entries of the config in cases 2 and 3. Images are first converted to the
model's channel count (RGB, or grayscale for a 1-channel first convolution).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from .errors import ConfigError, InputTypeError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "input_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OVERRIDES = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")


class AsImage:
    """A PIL image or a uint8 numpy array ``[H, W]`` / ``[H, W, C]`` -> a PIL image in ``mode``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
                raise InputTypeError(
                    f"input_transform takes PIL images or uint8 arrays [H, W] / [H, W, C]; got an array "
                    f"{img.dtype} {img.shape}. Convert it (e.g. (a * 255).round().astype(np.uint8) for "
                    "floats in [0, 1], a.transpose(1, 2, 0) for [C, H, W])."
                )
            img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
        if not isinstance(img, Image.Image):
            raise InputTypeError(f"input_transform takes PIL images or uint8 numpy arrays, got {type(img).__name__}.")
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"AsImage(mode={self.mode!r})"


def _channels(v: tuple[float, ...], c: int) -> tuple[float, ...]:
    v = tuple(float(a) for a in v)
    if len(v) == c:
        return v
    return (sum(v) / len(v),) * c if c == 1 else (v[0],) * c


def _torchvision_weights(weights: Any) -> Any:
    if isinstance(weights, str):
        import torchvision

        try:
            return torchvision.models.get_weight(weights)
        except (ValueError, KeyError, AttributeError) as e:
            raise ConfigError(
                f"unknown torchvision weights {weights!r}; pass a weights enum member or its name, e.g. "
                "'ResNet50_Weights.IMAGENET1K_V2' (see torchvision.models.get_model_weights(name))."
            ) from e
    if not callable(getattr(weights, "transforms", None)):
        raise ConfigError(f"weights= must be a torchvision weights enum member, got {type(weights).__name__}.")
    return weights


def input_transform(model: nn.Module, *, weights: Any = None, **overrides: Any) -> Callable[[Any], Any]:
    """The evaluation preprocessing of ``model``: PIL image / uint8 array -> tensor ``[C, H, W]``.

    See the module docstring for where the configuration comes from. Stack the outputs into a
    batch for ``det.score``: ``torch.stack([tf(img) for img in images])``.
    """
    from torchvision import transforms as T

    from .taps import first_conv_channels

    if not isinstance(model, nn.Module):
        raise ConfigError(f"input_transform needs the torch.nn.Module model, got {type(model).__name__}.")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ConfigError(f"input_transform has no option {unknown[0]!r}; overrides: {list(_OVERRIDES)}.")
    chans = first_conv_channels(model)
    isz = overrides.get("input_size")
    if isinstance(isz, int):
        overrides["input_size"] = (chans or 3, isz, isz)
    elif isz is not None and len(isz) == 2:
        overrides["input_size"] = (chans or 3, *isz)
    if weights is not None:
        if overrides:
            raise ConfigError("torchvision weights fix the preprocessing; drop the overrides or weights=.")
        return T.Compose([AsImage("L" if chans == 1 else "RGB"), _torchvision_weights(weights).transforms()])

    import timm.data

    if getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None):
        cfg = timm.data.resolve_data_config(dict(overrides), model=model)
    else:
        size = getattr(model, "image_size", None)
        size = int(size) if isinstance(size, int) else 224
        base: dict[str, Any] = {
            "input_size": (chans or 3, size, size),
            "interpolation": "bilinear",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "crop_pct": 0.875,
            "crop_mode": "center",
        }
        cfg = {**base, **overrides}
    c = int(chans or cfg["input_size"][0])
    cfg["input_size"] = (c, *tuple(cfg["input_size"])[1:])
    cfg["mean"] = _channels(tuple(cfg["mean"]), c)
    cfg["std"] = _channels(tuple(cfg["std"]), c)
    tf = timm.data.create_transform(**cfg, is_training=False)
    return T.Compose([AsImage("L" if c == 1 else "RGB"), *getattr(tf, "transforms", [tf])])
