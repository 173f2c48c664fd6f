"""Model transformation: batch-norm layers without affine parameters (RNA's models).

RNA's official CIFAR ResNet-18 and ImageNet ResNet-50 use ``BatchNorm(affine=False)``: the
layers normalise with batch (train) or running (eval) statistics but have no learnable scale
``gamma`` or shift ``beta``, so the network cannot inflate or shrink feature norms through the
BN scale. (The CIFAR model keeps the BN of each downsampling shortcut affine; pass those names
in ``keep_affine``.) Shin & Chung, TMLR 2024, arXiv:2408.10676.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["batchnorm_layers", "make_bn_non_affine"]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every batch-norm layer of ``model`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's
    ``BatchNormAct2d`` and other subclasses), as ``(name, module)`` in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def make_bn_non_affine(model: nn.Module, *, keep_affine: Sequence[str] = (), warn: bool = True) -> list[str]:
    """Remove ``gamma``/``beta`` from every batch-norm layer of ``model``, in place.

    Works on any model: every :class:`torch.nn.modules.batchnorm._BatchNorm` subclass is
    converted by setting ``affine = False`` and its ``weight``/``bias`` parameters to ``None``
    (``F.batch_norm`` then applies no affine transform). Running statistics are kept. Layers
    whose name matches a pattern of ``keep_affine`` (``fnmatch``, e.g. ``"*downsample.1"``)
    stay affine. Build the optimizer **after** the conversion; load checkpoints of converted
    models into a model converted the same way.

    A layer whose ``gamma``/``beta`` are not the identity (a pretrained model, or an
    initialisation such as timm's zero-init of the last BN of residual blocks) changes the
    network's function when converted; a warning says so (``warn=False`` silences it).

    Returns the names of the converted layers.
    """
    converted: list[str] = []
    changed: list[str] = []
    for name, m in batchnorm_layers(model):
        if not m.affine or any(fnmatch.fnmatchcase(name, p) for p in keep_affine):
            continue
        w, b = m.weight, m.bias
        if w is not None and b is not None:
            with torch.no_grad():
                if not (bool((w == 1).all()) and bool((b == 0).all())):
                    changed.append(name)
        m.register_parameter("weight", None)
        m.register_parameter("bias", None)
        m.affine = False
        converted.append(name)
    if warn and changed:
        warnings.warn(
            f"make_bn_non_affine removed non-identity affine parameters (gamma != 1 or beta != 0) from "
            f"{len(changed)} batch-norm layer(s) (e.g. {changed[0]!r}); the model's outputs change. That is "
            "expected when training from scratch (e.g. timm zero-initialises the last BN of residual "
            "blocks); a pretrained model must be fine-tuned after the conversion.",
            stacklevel=2,
        )
    return converted
