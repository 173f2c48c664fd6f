"""Fine-tuning runs for RNA, Separation (PFS) and their plain baselines (on the one optimisation
loop, :func:`normscore.tools.trainer.train_steps`; the methods and the config: :mod:`.config`).

Methods (``FinetuneConfig.method``) and their per-step objective on a batch of ``B`` ID samples
``(x_i, y_i)`` and ``B_out`` auxiliary OOD samples ``u_j`` (``z`` = penultimate features, the
input of the model's linear head, found automatically by :func:`normscore.get_adapter`):

============  ================================================================  ============
method        loss                                                              OOD in batch
============  ================================================================  ============
``ce``        ``CE(f(x), y)``                                                   no
``la_ce``     ``CE(f(x) + tau log pi, y)``                                      no
``ce_oe``     ``CE + oe_weight * OE(f(u))``                                     yes
``la_ce_oe``  ``LA-CE + oe_weight * OE(f(u))``                                  yes
``rna``       ``LA-CE + rna_lambda * L_RNA(g(z_x))`` - no loss on the OOD rows  yes (BN only)
``separation`` ``CE + oe_weight * OE + sep_weight * L_Sep(z_u) + clu_weight *   yes
              L_Clu(z_x, y)``; the last two from ``feature_loss_start_epoch``
============  ================================================================  ============

When OOD data is used, ID and OOD images are concatenated and forwarded **once, in train
mode**, so every batch-norm layer normalises with (and accumulates running statistics of) the
joint ID+OOD batch - exactly as the official RNA and PFS code. For RNA this is the *only* way
the OOD images act: gradients reach them only through the shared batch statistics.

Determinism and resuming: every random choice (ID order, OOD order, augmentation, dropout) is
drawn from generators seeded by ``(seed, epoch)``; checkpoints (``checkpoint.pt``: a state
dict of tensors and plain values, read with ``torch.load(weights_only=True)``, plus a JSON
mirror) are written atomically at the end of every epoch and every ``checkpoint_every`` steps,
and store the optimizer, the running loss sums and the generator states, so a run that is
killed and resumed (``resume=True``) ends bit-identical to an uninterrupted one on the same
machine and thread count.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import get_adapter, model_output_tensor
from ..errors import ConfigError, FormatError, InputError
from ..files import atomic_write
from ..taps import penultimate_with_grad
from ..tools.trainer import augment_batch, train_steps
from .bn import make_bn_non_affine
from .config import METHODS, FinetuneConfig, Method
from .losses import (
    ProjectionHead,
    class_prior,
    clustering_loss,
    logit_adjusted_ce,
    outlier_exposure_loss,
    rna_loss,
    separation_loss,
)

__all__ = [
    "METHODS",
    "FinetuneConfig",
    "FinetuneResult",
    "Method",
    "augment_batch",
    "finetune",
    "load_finetuned",
    "method_loss",
    "penultimate_with_grad",
    "read_run",
]


CHECKPOINT_FORMAT = "normscore-finetune-checkpoint"
MODEL_FORMAT = "normscore-finetune-model"
FORMAT_VERSION = 1


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns. ``model`` is trained in place and left in eval mode."""

    model: nn.Module
    config: FinetuneConfig
    class_counts: list[int]
    history: list[dict[str, float]] = field(default_factory=list)
    projection: nn.Module | None = None
    steps: int = 0
    out_dir: str | None = None


# ---------------------------------------------------------------------------------------------
# pieces (public so that tests and custom loops can use them)


def method_loss(
    config: FinetuneConfig,
    logits: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    prior: torch.Tensor | None = None,
    projection: nn.Module | None = None,
    head_weight: torch.Tensor | None = None,
    feature_losses: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective of ``config.method`` on one (mixed) batch.

    ``logits`` ``[B + B_out, C]`` and ``z`` ``[B + B_out, D]`` hold the ``B = len(labels)`` ID
    rows first, then the auxiliary OOD rows. ``prior`` is needed for logit adjustment,
    ``projection`` for RNA and ``head_weight`` (``[C, D]``, detached inside the losses) for the
    separation terms, which are added only when ``feature_losses`` is true. Returns the total
    loss and the value of every term (``cls``, ``oe``, ``rna``, ``sep``, ``clu``, ``total``).
    """
    n = int(labels.shape[0])
    lid, lood = logits[:n], logits[n:]
    terms: dict[str, torch.Tensor] = {}
    if config.uses_la:
        if prior is None:
            raise ValueError(f"method {config.method!r} needs the class prior")
        terms["cls"] = logit_adjusted_ce(lid, labels, prior, config.tau)
    else:
        terms["cls"] = F.cross_entropy(lid, labels)
    total = terms["cls"]
    if config.uses_oe:
        if lood.shape[0] == 0:
            raise ValueError(f"method {config.method!r} needs auxiliary OOD rows in the batch")
        terms["oe"] = outlier_exposure_loss(lood)
        total = total + config.oe_weight * terms["oe"]
    if config.uses_rna:
        if projection is None:
            raise ValueError("method 'rna' needs the projection head")
        terms["rna"] = rna_loss(z[:n], projection)
        total = total + config.rna_lambda * terms["rna"]
    if config.uses_features and feature_losses:
        if head_weight is None:
            raise ValueError("method 'separation' needs the head weight")
        terms["sep"] = separation_loss(z[n:], head_weight, per_class=config.sep_per_class)
        terms["clu"] = clustering_loss(z[:n], labels, head_weight)
        total = total + config.sep_weight * terms["sep"] + config.clu_weight * terms["clu"]
    values = {k: float(v.detach()) for k, v in terms.items()}
    values["total"] = float(total.detach())
    return total, values


def _seed(seed: int, epoch: int, stream: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(stream)) % (2**63 - 1)


def _as_tensors(data: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [N, C, H, W] float, y [N] long)`` from a dataset or a pair of tensors."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise InputError(f"{what} must be a map-style dataset of (x, y) items or a pair of tensors (x, y).")
        if len(data) == 0:  # type: ignore[arg-type]
            raise InputError(f"{what} is empty.")
        xs, ys = [], []
        for xb, yb in torch.utils.data.DataLoader(data, batch_size=1024, shuffle=False):  # type: ignore[arg-type]
            xs.append(xb)
            ys.append(torch.as_tensor(yb))
        x, y = torch.cat(xs), torch.cat(ys)
    if x.ndim != 4 or not x.is_floating_point():
        raise InputError(f"{what}: images must be float [N, C, H, W], got {x.dtype} {tuple(x.shape)}.")
    return x.contiguous(), y.long().reshape(-1)


def _atomic_save(obj: object, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _atomic_json(obj: object, path: str) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# the loop


def finetune(
    model: nn.Module,
    id_data: torch.utils.data.Dataset | tuple[torch.Tensor, torch.Tensor],
    config: FinetuneConfig | None = None,
    *,
    aux_ood: torch.utils.data.Dataset | torch.Tensor | None = None,
    class_counts: Sequence[int] | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    metadata: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place with ``config.method``; returns a :class:`FinetuneResult`.

    Parameters
    ----------
    model: any classifier with a linear head (timm, torchvision, custom); its head and
        penultimate features are resolved by :func:`normscore.get_adapter`.
    id_data: labelled ID training data (a map-style dataset of ``(x, y)`` or tensors
        ``(x, y)``), e.g. a long-tail subset from :func:`~normscore.finetune.long_tail_subset`.
        It is loaded into memory once.
    config: :class:`FinetuneConfig` (default: ``FinetuneConfig()``, i.e. RNA).
    aux_ood: auxiliary OOD images (dataset or tensor ``[N, C, H, W]``), needed by the methods
        with OOD rows; see :func:`~normscore.finetune.aux_ood_dataset`.
    class_counts: training counts per class for the logit-adjustment prior (default: counted
        from the labels).
    out_dir: where checkpoints and the final ``model.pt`` / ``model.json`` go (None: nothing
        is written and the run cannot be resumed).
    resume: continue from ``out_dir/checkpoint.pt`` if it exists (its config must equal
        ``config``). Without ``resume``, an existing checkpoint is an error.
    callback: called after every step (and after its checkpoint, if any) with a dict
        ``{"step", "epoch", "losses"}``; an exception raised there stops the run like a kill.
    metadata: extra JSON-serialisable values stored in ``model.json`` (e.g. the model spec).
    """
    cfg = config if config is not None else FinetuneConfig()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"finetune needs a torch.nn.Module, got {type(model).__name__}.")
    xs, ys = _as_tensors(id_data, "id_data")
    if ys.min() < 0:
        raise InputError("id_data has negative labels; ID training data must be labelled 0..C-1.")
    xo: torch.Tensor | None = None
    if cfg.uses_ood:
        if aux_ood is None:
            raise ConfigError(
                f"method {cfg.method!r} trains with auxiliary OOD images; pass aux_ood= (e.g. "
                "normscore.finetune.aux_ood_dataset(channels=..., image_size=...))."
            )
        xo = aux_ood if isinstance(aux_ood, torch.Tensor) else _as_tensors(aux_ood, "aux_ood")[0]
        if xo.shape[1:] != xs.shape[1:]:
            raise InputError(
                f"aux_ood images have shape {tuple(xo.shape[1:])} but ID images {tuple(xs.shape[1:])}; "
                "build the auxiliary set with the same channels and image size."
            )
    dev = torch.device(device)
    model.to(dev)
    converted: list[str] = []
    if cfg.non_affine_bn:
        converted = make_bn_non_affine(model, keep_affine=cfg.keep_affine)

    adapter = get_adapter(model)
    adapter.ensure_resolved(xs[:1].to(dev))  # eval-mode, no-grad probe: BN statistics untouched
    head = adapter.head
    num_classes = int(adapter.num_classes or 0)
    if int(ys.max()) >= num_classes:
        raise InputError(f"labels go up to {int(ys.max())} but the model has {num_classes} outputs.")
    counts = (
        [int(c) for c in class_counts]
        if class_counts is not None
        else torch.bincount(ys, minlength=num_classes).tolist()
    )
    if len(counts) != num_classes:
        raise ConfigError(f"class_counts has {len(counts)} entries; the model has {num_classes} classes.")
    prior = class_prior(counts).to(dev) if cfg.uses_la else None

    projection: nn.Module | None = None
    if cfg.uses_rna:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(cfg.seed, -1, 9))
            projection = ProjectionHead(adapter.num_features, cfg.projection_hidden, cfg.projection_dim).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if projection is not None:
        params += list(projection.parameters())
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)

    n_id = xs.shape[0]
    bs = min(cfg.batch_size, n_id)
    steps_per_epoch = n_id // bs
    total_steps = cfg.epochs * steps_per_epoch
    obs = cfg.effective_ood_batch_size

    def lr_at(step: int) -> float:
        if cfg.schedule == "constant":
            return cfg.lr
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    # ------------------------------------------------------------------ resume
    step, history = 0, []
    sums: dict[str, float] = {}
    aug_state: torch.Tensor | None = None
    rng_state: tuple[torch.Tensor, torch.Tensor | None] | None = None
    cuda = dev.type == "cuda"
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    if ckpt_path and os.path.exists(ckpt_path):
        if not resume:
            raise ConfigError(
                f"{ckpt_path} exists; pass resume=True (CLI: --resume) to continue that run, or choose another out_dir."
            )
        ck = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise FormatError(f"{ckpt_path} is not a normscore fine-tuning checkpoint.")
        saved = FinetuneConfig.from_dict(json.loads(ck["config"]))
        if saved != cfg:
            diff = {k: (v, getattr(cfg, k)) for k, v in asdict(saved).items() if asdict(cfg)[k] != v}
            raise ConfigError(f"cannot resume {ckpt_path}: its config differs (saved, given): {diff}.")
        model.load_state_dict(ck["model"])
        if projection is not None:
            projection.load_state_dict(ck["projection"])
        opt.load_state_dict(ck["optimizer"])
        step, history, sums = int(ck["step"]), list(ck["history"]), dict(ck["sums"])
        rng_state = (ck["rng_torch"], ck.get("rng_cuda"))
        aug_state = ck["rng_aug"]

    def save_checkpoint(g_aug: torch.Generator) -> None:
        if not out_dir or ckpt_path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "config": json.dumps(cfg.to_dict(), sort_keys=True),
            "step": step,
            "model": model.state_dict(),
            "projection": projection.state_dict() if projection is not None else {},
            "optimizer": opt.state_dict(),
            "history": history,
            "sums": sums,
            "rng_torch": torch.get_rng_state(),
            "rng_aug": g_aug.get_state(),
        }
        if cuda:
            state["rng_cuda"] = torch.cuda.get_rng_state(dev)
        _atomic_save(state, ckpt_path)
        _atomic_json(
            {"config": cfg.to_dict(), "step": step, "total_steps": total_steps, "history": history},
            os.path.join(out_dir, "checkpoint.json"),
        )

    # ------------------------------------------------------------------ train
    t0 = time.time()
    aug = {"g": None}  # the current epoch's augmentation generator (saved in checkpoints)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nonlocal aug_state, sums
        epoch, k0 = divmod(step, steps_per_epoch)
        while epoch < cfg.epochs:
            perm = torch.randperm(n_id, generator=torch.Generator().manual_seed(_seed(cfg.seed, epoch, 0)))
            operm = None
            if xo is not None:
                go = torch.Generator().manual_seed(_seed(cfg.seed, epoch, 1))
                reps = -(-steps_per_epoch * obs // xo.shape[0])
                operm = torch.cat([torch.randperm(xo.shape[0], generator=go) for _ in range(reps)])
            g_aug = aug["g"] = torch.Generator().manual_seed(_seed(cfg.seed, epoch, 2))
            if k0 == 0:
                torch.manual_seed(_seed(cfg.seed, epoch, 3))
                sums = {}
            elif aug_state is not None:
                g_aug.set_state(aug_state.cpu())
            aug_state = None
            for k in range(k0, steps_per_epoch):
                idx = perm[k * bs : (k + 1) * bs]
                x, y = xs[idx].to(dev), ys[idx].to(dev)
                if operm is not None and xo is not None:
                    x = torch.cat([x, xo[operm[k * obs : (k + 1) * obs]].to(dev)])
                if cfg.augment:
                    x = augment_batch(x, g_aug, cfg.augment_shift, cfg.augment_flip)
                yield x, y
            epoch, k0 = epoch + 1, 0

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        store.clear()
        logits = model_output_tensor(model(x))
        if "z" not in store:
            raise InputError(f"the head {adapter.head_name!r} did not run in the forward pass.")
        feat_on = cfg.uses_features and step // steps_per_epoch >= cfg.start_epoch_features
        return method_loss(
            cfg,
            logits,
            store["z"],
            y,
            prior=prior,
            projection=projection,
            head_weight=getattr(head, "weight", None),
            feature_losses=feat_on,
        )

    def on_step(done: int, values: dict[str, float]) -> None:
        nonlocal step, sums
        step = done
        epoch = (step - 1) // steps_per_epoch
        for key, v in values.items():
            sums[key] = sums.get(key, 0.0) + v
        sums["n"] = sums.get("n", 0.0) + 1
        if step % steps_per_epoch == 0:
            n_steps = sums.pop("n")
            history.append({"epoch": epoch, "lr": lr_at(step - 1), **{k_: v / n_steps for k_, v in sums.items()}})
            sums = {}
        if step % steps_per_epoch == 0 or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            save_checkpoint(aug["g"])
        if callback is not None:
            callback({"step": step, "epoch": epoch, "losses": values})

    model.train()
    if projection is not None:
        projection.train()
    try:
        # the run's own random stream; the caller's global RNG state is restored afterwards
        with torch.random.fork_rng(devices=[dev] if cuda else []), penultimate_with_grad(head) as store:
            if rng_state is not None:
                torch.set_rng_state(rng_state[0].cpu())
                if cuda and rng_state[1] is not None:
                    torch.cuda.set_rng_state(rng_state[1].cpu(), dev)
            train_steps(
                opt,
                batches(),
                loss_fn,
                lr_at=lr_at,
                total_steps=total_steps,
                start_step=step,
                desc=f"finetune {cfg.method}",
                progress=progress,
                on_step=on_step,
            )
    finally:
        model.eval()
        if projection is not None:
            projection.eval()

    if out_dir:
        _atomic_save(model.state_dict(), os.path.join(out_dir, "model.pt"))
        if projection is not None:
            _atomic_save(projection.state_dict(), os.path.join(out_dir, "projection.pt"))
        meta = {
            "format": MODEL_FORMAT,
            "version": FORMAT_VERSION,
            "config": cfg.to_dict(),
            "num_classes": num_classes,
            "class_counts": counts,
            "head": adapter.head_name,
            "num_features": adapter.num_features,
            "bn_non_affine_layers": converted,
            "train_samples": int(n_id),
            "aux_ood_samples": int(xo.shape[0]) if xo is not None else 0,
            "steps": step,
            "seconds_last_session": round(time.time() - t0, 1),
            "history": history,
            "metadata": metadata or {},
        }
        _atomic_json(meta, os.path.join(out_dir, "model.json"))
    return FinetuneResult(
        model=model,
        config=cfg,
        class_counts=counts,
        history=history,
        projection=projection,
        steps=step,
        out_dir=out_dir,
    )


def read_run(run_dir: str) -> dict[str, Any]:
    """The ``model.json`` of a finished run (raises ``FormatError`` if it is not one)."""
    path = os.path.join(run_dir, "model.json")
    if not os.path.exists(path):
        raise FormatError(f"{path} does not exist; {run_dir!r} is not a finished normscore-finetune run.")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != MODEL_FORMAT:
        raise FormatError(f"{path} is not a normscore-finetune model description.")
    return meta


def load_finetuned(model: nn.Module, run_dir: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load the weights of a finished run into ``model`` (same architecture, freshly built).

    Applies the run's batch-norm conversion first (if it used ``non_affine_bn``), loads
    ``model.pt`` with ``torch.load(weights_only=True)`` and returns the model in eval mode.
    """
    meta = read_run(run_dir)
    cfg = FinetuneConfig.from_dict(meta["config"])
    if cfg.non_affine_bn:
        make_bn_non_affine(model, keep_affine=cfg.keep_affine, warn=False)
    sd = torch.load(os.path.join(run_dir, "model.pt"), map_location=device, weights_only=True)
    model.load_state_dict(sd)
    return model.to(device).eval()
