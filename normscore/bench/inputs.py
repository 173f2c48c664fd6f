"""What a benchmark run reads: its model (loaded, or trained on the ID training split and
cached by recipe - :func:`build_bench_model`) and its data splits (:func:`load_splits`: the fit
split, the live-fit split, the ID test split, the OOD sets and, with ``--search``, the
validation ID images - disjoint from the fit images - and the validation OOD set)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..data import ImageSet, get_dataset
from ..errors import ConfigError
from ..tools.model_names import parse_model_name
from .config import BenchConfig, SplitRef, retrains_head, trains_model
from .models import InputFormat, LoadedModel, build_model, train_cached, weights_hash
from .plan import SplitPlan

__all__ = ["build_bench_model", "load_splits", "model_name", "native_format"]


def model_name(cfg: BenchConfig, plan: SplitPlan) -> str:
    """The model of the run: ``--model``, else the suite's, else ``smallcnn``."""
    return cfg.model or (plan.suite.model if plan.suite else "smallcnn")


def native_format(cfg: BenchConfig, plan: SplitPlan, name: str) -> InputFormat:
    """The input format a fresh model of ``name`` gets for the ID data set."""
    info = plan.info
    if info.files or info.native_size is None:
        size = cfg.image_size or (32 if name.partition(":")[0] == "smallcnn" else 224)
        return InputFormat(3, (size, size), crop_pct=0.875)
    return InputFormat(info.native_channels or 1, (info.native_size, info.native_size))


def build_bench_model(
    cfg: BenchConfig,
    plan: SplitPlan,
    *,
    train_seed: int,
    device: torch.device,
    cache_root: str | None,
    log: Callable[[str], None],
) -> tuple[LoadedModel, int]:
    """The model of the run on ``device`` in eval mode, and the number of classes."""
    name = parse_model_name(model_name(cfg, plan), check=False).canonical
    if retrains_head(cfg):  # the suite's pretrained model with a new linear head (bench.probe)
        from .probe import build_head_model

        return build_head_model(
            cfg, plan, name=name, train_seed=train_seed, device=device, cache_root=cache_root, log=log
        )
    native = native_format(cfg, plan, name)
    train = trains_model(cfg)
    if cfg.train_epochs is not None and cfg.checkpoint:
        raise ConfigError("--checkpoint and --train-epochs exclude each other.")
    epochs = cfg.train_epochs
    if train and epochs is None:
        epochs = (plan.suite.train_epochs if plan.suite else None) or 3
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--train-epochs must be >= 1, got {epochs}.")
    num_classes = plan.info.num_classes

    def train_split(**fmt: Any) -> ImageSet:  # the ID training split (subsampled as --limit/--seed say)
        return get_dataset(cfg.id, plan.train_split, data_root=cfg.data_root, limit=cfg.limit, seed=cfg.seed, **fmt)

    train_set = None
    if num_classes is None or train:
        train_set = train_split(channels=native.channels, image_size=native.size, crop_pct=native.crop_pct)
        if num_classes is None:
            num_classes = len(train_set.class_names or []) or int(train_set.labels.max()) + 1
    with torch.random.fork_rng(devices=[]):  # a freshly initialised model is seeded
        torch.manual_seed(train_seed)
        lm = build_model(
            name,
            num_classes=int(num_classes),
            in_chans=native.channels,
            checkpoint=cfg.checkpoint,
            train=train,
            native_format=native,
            id_files=plan.info.files,
            image_size=cfg.image_size,
        )
    if train:
        assert train_set is not None and epochs is not None
        fmt = lm.format
        train_set = train_split(**fmt.dataset_kwargs())
        if int(train_set.labels.min()) < 0:
            raise ConfigError(f"--id {cfg.id}: the training split has unlabelled images; cannot train on it.")
        recipe = {
            "arch": name,
            "num_classes": int(num_classes),
            "in_chans": fmt.channels,
            "dataset": cfg.id,
            "split": plan.train_split,
            "data": train_set.fingerprint(),
            "limit": cfg.limit,
            "format": fmt.describe(),
            "init_sha256": weights_hash(lm.model),  # architecture, width and initialisation
            "epochs": int(epochs),
            "seed": train_seed,
            "lr": cfg.lr,
            "batch_size": cfg.train_batch_size,
            "weight_decay": 5e-4,
            "augment": True,
            "deterministic": True,
        }
        models_root = None
        if cache_root:
            models_root = os.path.join(cache_root, "models")
            os.makedirs(models_root, exist_ok=True)
        lm = train_cached(lm, train_set, recipe, cache_root=models_root, device=device, progress=cfg.progress, log=log)
    lm.model.to(device).eval()
    lm.weights_sha256 = weights_hash(lm.model)
    return lm, int(num_classes)


def load_splits(
    cfg: BenchConfig, plan: SplitPlan, fmt: InputFormat, log: Callable[[str], None]
) -> tuple[dict[str, ImageSet], dict[str, SplitRef]]:
    """The run's data splits and their references, by split name."""
    kw = fmt.dataset_kwargs()
    lim = cfg.limit
    train_full = get_dataset(cfg.id, plan.train_split, data_root=cfg.data_root, **kw)
    n = len(train_full)
    s = plan.suite
    fit_n = cfg.fit_size if cfg.fit_size is not None else (s.fit_size if s else None)
    fit_n = min(n, fit_n or n, lim or n)
    live_n = cfg.live_fit_size if cfg.live_fit_size is not None else (s.live_fit_size if s else None)
    live_n = min(fit_n, live_n or fit_n)
    test_n = cfg.test_size if cfg.test_size is not None else (s.test_size if s else None)
    test_lim = min(x for x in (test_n, lim) if x is not None) if (test_n or lim) else None
    perm = np.random.default_rng(cfg.seed).permutation(n)
    fit_rows = np.sort(perm[:fit_n])
    sets: dict[str, ImageSet] = {"fit": train_full.subset(fit_rows)}
    refs: dict[str, SplitRef] = {"fit": SplitRef("fit", cfg.id, plan.train_split, "fit")}
    sets["live-fit"] = train_full.subset(np.sort(perm[:live_n]))
    refs["live-fit"] = SplitRef("live-fit", cfg.id, plan.train_split, "fit")
    sets["id"] = get_dataset(cfg.id, plan.test_split, data_root=cfg.data_root, limit=test_lim, seed=cfg.seed, **kw)
    refs["id"] = SplitRef("id", cfg.id, plan.test_split, "id")
    if int((sets["id"].labels >= 0).sum()) == 0:
        log(f"note: the ID test split {cfg.id}:{plan.test_split} is unlabelled; no ID accuracy")
    for r in plan.ood_refs:
        sets[r.label] = get_dataset(r.dataset, r.split, data_root=cfg.data_root, limit=test_lim, seed=cfg.seed, **kw)
        refs[r.label] = r
    if plan.val_ref is not None:
        vn = min(cfg.val_size, lim or cfg.val_size)
        val_rows = np.sort(perm[fit_n : fit_n + vn])
        if val_rows.size == 0:
            raise ConfigError(
                f"--search needs validation ID images beyond the {fit_n} fit images, but the training "
                f"split has only {n}; lower --fit-size."
            )
        sets["val-id"] = train_full.subset(val_rows)
        refs["val-id"] = SplitRef("val-id", cfg.id, plan.train_split, "val-id")
        sets["val-ood"] = get_dataset(
            plan.val_ref.dataset, plan.val_ref.split, data_root=cfg.data_root, limit=vn, seed=cfg.seed, **kw
        )
        refs["val-ood"] = plan.val_ref
    for k, ds in sets.items():
        if len(ds) == 0:
            raise ConfigError(f"split {k} ({refs[k].dataset}:{refs[k].split}) is empty.")
    return sets, refs
