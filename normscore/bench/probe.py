"""A new linear head on a frozen pretrained model: the classifier of the ``fashion-mnist-effnet``
suite (``normscore-bench --suite fashion-mnist-effnet``).

The recipe (:func:`build_head_model`):

1. the suite's pretrained model (``efficientnet_lite0``: timm ``tf_efficientnet_lite0`` with real
   ImageNet-1k weights, :func:`normscore.tools.zoo.load_model`) in eval mode, in its own input
   format at the suite's size (64 px; gray images replicated to 3 channels; the model's
   normalisation, mean = std = 0.5 for this TF-ported model);
2. its ImageNet classifier is replaced by ``nn.Linear(num_features, num_classes)`` initialised
   at **zero** (the problem is convex: the seed only orders the data);
3. the backbone's pooled pre-logit features (``forward_head(forward_features(x),
   pre_logits=True)``: what the classifier reads, the adapter's ``penultimate``) of every training
   image are computed **once**, without autograd, in channels-last memory format (1.6x faster
   on the CPU), on one intra-op thread (:func:`~normscore.tools.trainer.deterministic_training`);
4. the head alone is trained on those features with
   :func:`~normscore.tools.trainer.train_steps` (normscore's one optimisation loop): cross-entropy,
   SGD with Nesterov momentum 0.9, peak learning rate ``HEAD_LR`` after a 15 % linear warm-up then
   cosine decay per step (the trainer's schedule), weight decay ``HEAD_WEIGHT_DECAY``, batch
   ``HEAD_BATCH_SIZE``, data order from a generator seeded by the training seed, no augmentation
   (the features are fixed), the suite's epochs (``--train-epochs`` overrides them).

Every other parameter and buffer (BatchNorm statistics included) keeps its ImageNet value, so
block features are the real multi-stage ImageNet features. The whole state dict is cached under
``<cache>/models/`` by :func:`normscore.bench.models.train_cached`, keyed by the recipe: the
initial weights' hash (backbone + zero head), the data set and a fingerprint of its training
images, the input format, the head's hyperparameters and seed, and the source hashes of the
trainer and of this module. Training is bitwise reproducible on one CPU type (one thread,
seeded order, fixed archive name of the checkpoint).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..data import get_dataset
from ..errors import ConfigError
from ..progress import progress_bar
from ..tools.trainer import _warmup_cosine, deterministic_training, train_steps
from .config import BenchConfig, suite_of
from .models import LoadedModel, pretrained_format, train_cached, weights_hash
from .plan import SplitPlan

__all__ = ["HEAD_BATCH_SIZE", "HEAD_LR", "HEAD_WEIGHT_DECAY", "backbone_features", "build_head_model", "train_head"]

#: peak learning rate, batch size and weight decay of the new head (SGD, Nesterov momentum 0.9)
HEAD_LR = 0.01
HEAD_BATCH_SIZE = 128
HEAD_WEIGHT_DECAY = 5e-4
HEAD_MOMENTUM = 0.9
HEAD_WARMUP = 0.15


def probe_version() -> str:
    """Hash of this module's source: a change of the recipe's code retrains the head."""
    import sys

    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:12]


def _classifier(model: nn.Module) -> nn.Linear:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"{type(model).__name__} has no linear classifier to replace (get_classifier()); a new head "
            "can be trained only on timm classification models."
        )
    return head


def new_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Replace ``model``'s classifier by a zero-initialised ``nn.Linear`` for ``num_classes``."""
    model.reset_classifier(num_classes)
    head = _classifier(model)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    return head


@torch.no_grad()
def backbone_features(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled pre-logit features ``[N, D]`` (float32, CPU) of ``dataset`` and its labels, from
    a channels-last copy of ``model`` in eval mode (the model itself is not touched), on one
    intra-op thread on the CPU (bitwise reproducible)."""
    net = copy.deepcopy(model).to(device).eval().to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    feats, labels = [], []
    bar = progress_bar(total=len(dataset), desc="backbone features", enabled=progress, unit="img")
    try:
        with deterministic_training(device):
            for x, y in loader:
                x = x.to(device).contiguous(memory_format=torch.channels_last)
                f = net.forward_head(net.forward_features(x), pre_logits=True)
                feats.append(f.float().cpu())
                labels.append(y)
                bar.update(len(y))
    finally:
        bar.close()
    return torch.cat(feats), torch.cat(labels)


def train_head(
    head: nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float = HEAD_LR,
    batch_size: int = HEAD_BATCH_SIZE,
    weight_decay: float = HEAD_WEIGHT_DECAY,
    progress: bool | None = None,
) -> int:
    """Train ``head`` in place on fixed ``features`` with :func:`train_steps` (recipe in the module
    docstring), on one CPU thread; returns the number of steps."""
    n = int(features.shape[0])
    if n == 0:
        raise ConfigError("no training images to train the head on.")
    bs = min(int(batch_size), n)
    per_epoch = n // bs
    steps = max(1, epochs * per_epoch)
    factor = _warmup_cosine(steps, HEAD_WARMUP)
    g = torch.Generator().manual_seed(int(seed))
    dev = head.weight.device
    x_all, y_all = features.to(dev), labels.to(dev)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            for i in range(per_epoch):
                idx = perm[i * bs : (i + 1) * bs].to(dev)
                yield x_all[idx], y_all[idx]

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = nn.functional.cross_entropy(head(x), y)
        return loss, {"total": float(loss.item())}

    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=HEAD_MOMENTUM, nesterov=True, weight_decay=weight_decay)
    head.train()
    with deterministic_training(dev):
        done = train_steps(
            opt, batches(), loss_fn, lr_at=lambda k: lr * factor(k), total_steps=steps, desc="head", progress=progress
        )
    head.eval()
    return done


def build_head_model(
    cfg: BenchConfig,
    plan: SplitPlan,
    *,
    name: str,
    train_seed: int,
    device: torch.device,
    cache_root: str | None,
    log: Callable[[str], None],
) -> tuple[LoadedModel, int]:
    """The suite's pretrained model with a new linear head trained here (or loaded from the
    cache), on ``device`` in eval mode, and the number of classes."""
    from ..tools.zoo import load_model

    suite = suite_of(cfg)
    assert suite is not None
    epochs = cfg.train_epochs if cfg.train_epochs is not None else (suite.train_epochs or 10)
    if epochs < 1:
        raise ConfigError(f"--train-epochs must be >= 1, got {epochs}.")
    model = load_model(name)
    fmt = pretrained_format(model, cfg.image_size or suite.image_size)
    train_set = get_dataset(
        cfg.id, plan.train_split, data_root=cfg.data_root, limit=cfg.limit, seed=cfg.seed, **fmt.dataset_kwargs()
    )
    if int(train_set.labels.min()) < 0:
        raise ConfigError(f"--id {cfg.id}: the training split has unlabelled images; cannot train a head on it.")
    num_classes = plan.info.num_classes or (int(train_set.labels.max()) + 1)
    new_head(model, int(num_classes))
    model.eval()
    lm = LoadedModel(model, name, "local", "pretrained+head", fmt)
    recipe = {
        "arch": name,
        "retrain": "head",
        "num_classes": int(num_classes),
        "in_chans": fmt.channels,
        "dataset": cfg.id,
        "split": plan.train_split,
        "data": train_set.fingerprint(),
        "limit": cfg.limit,
        "format": fmt.describe(),
        "init_sha256": weights_hash(model),  # the ImageNet backbone and the zero head
        "features": "pooled pre-logits, eval mode, channels-last, one thread",
        "epochs": int(epochs),
        "seed": train_seed,
        "lr": HEAD_LR,
        "batch_size": HEAD_BATCH_SIZE,
        "weight_decay": HEAD_WEIGHT_DECAY,
        "momentum": HEAD_MOMENTUM,
        "warmup": HEAD_WARMUP,
        "augment": False,
        "deterministic": True,
        "probe": probe_version(),
    }

    def fit(m: nn.Module, ds: torch.utils.data.Dataset) -> dict[str, Any]:
        t0 = time.perf_counter()
        feats, labels = backbone_features(m, ds, device=device, progress=cfg.progress)
        t1 = time.perf_counter()
        log(f"model: backbone features of {len(ds)} images in {t1 - t0:.1f} s; training the head")
        steps = train_head(_classifier(m).to(device), feats, labels, epochs=int(epochs), seed=train_seed)
        return {
            "features_seconds": round(t1 - t0, 2),
            "head_seconds": round(time.perf_counter() - t1, 2),
            "head_steps": steps,
        }

    models_root = None
    if cache_root:
        models_root = os.path.join(cache_root, "models")
        os.makedirs(models_root, exist_ok=True)
    lm = train_cached(
        lm, train_set, recipe, cache_root=models_root, device=device, progress=cfg.progress, log=log, train=fit
    )
    lm.model.to(device).eval()
    lm.weights_sha256 = weights_hash(lm.model)
    return lm, int(num_classes)
