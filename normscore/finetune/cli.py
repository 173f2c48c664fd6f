"""``normscore-finetune``: train and evaluate RNA / Separation / baseline runs from the shell
(examples: ``normscore-finetune --help``, written in ``_EPILOG`` below).

A run directory holds ``checkpoint.pt`` / ``checkpoint.json`` (resumable state), and when
finished ``model.pt`` (the model's state dict), ``projection.pt`` (RNA) and ``model.json``
(config, class counts, loss history and how to rebuild the model). ``eval`` rebuilds the model
from ``model.json`` and prints accuracy (overall, many/medium/few-shot) and, per detector and
OOD set, AUROC and FPR95 (ID positive).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, NormscoreError
from ..tools.cli_help import HelpFormatter
from ..tools.model_names import cli_model_name, parse_model_name
from .train import METHODS, FinetuneConfig, finetune, load_finetuned, read_run

__all__ = ["build_model", "main"]

_METHOD_HELP = {
    "ce": "cross-entropy (no auxiliary OOD)",
    "la_ce": "logit-adjusted CE, tau * log(prior) added to the logits (Menon et al. 2021)",
    "ce_oe": "CE + oe_weight * Outlier Exposure on auxiliary OOD (Hendrycks et al. 2019)",
    "la_ce_oe": "LA-CE + oe_weight * Outlier Exposure",
    "rna": "LA-CE + rna_lambda * RNA; OOD rows only shape BN statistics (Shin & Chung 2024)",
    "separation": "CE + oe_weight * OE + separation + clustering losses (Wu et al. 2025)",
}


def build_model(spec: str, num_classes: int, in_chans: int) -> nn.Module:
    """A randomly initialised model from a model name in the format of ``normscore-bench``
    (:func:`normscore.tools.model_names.parse_model_name`): ``smallcnn[:width]``, a timm name or
    ``tv:<name>`` (torchvision models need 3 input channels). The old spellings
    ``small_cnn[:width]``, ``timm:<name>`` and ``torchvision:<name>`` still work and warn."""
    m = parse_model_name(spec)
    if m.kind == "smallcnn":
        from ..tools.zoo import small_cnn

        return small_cnn(num_classes=num_classes, in_chans=in_chans, width=m.width or 32)
    if m.kind == "timm":
        import timm

        return timm.create_model(m.arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if m.kind == "torchvision":
        import torchvision

        if in_chans != 3:
            raise ConfigError(f"torchvision models take 3-channel images; pass --channels 3 (got {in_chans}).")
        return torchvision.models.get_model(m.arch, weights=None, num_classes=num_classes)
    raise _local_model_error(spec)


def _local_model_error(spec: str) -> ConfigError:
    return ConfigError(
        f"{spec} is a pretrained local model; normscore-finetune trains from random initialisation: "
        "use an architecture name (smallcnn[:width], a timm name such as tf_efficientnet_lite0, or tv:NAME)."
    )


_DESCRIPTION = "Train and evaluate RNA / Separation / baseline runs from the shell (see docs/finetune.md)."

_EPILOG = """\
examples:
  normscore-finetune methods
  normscore-finetune train --method rna --dataset fashion-mnist --long-tail 0.01 \\
      --model smallcnn --epochs 20 --non-affine-bn --out runs/rna-s0
  normscore-finetune train ... --out runs/rna-s0 --resume      # continue a killed run
  normscore-finetune eval runs/rna-s0 --ood mnist-5k sklearn-digits textures noise \\
      --detectors penultimate_norm msp energy

model names (as in normscore-bench): smallcnn or smallcnn:WIDTH, a timm name (resnet18),
tv:NAME for torchvision (tv:mobilenet_v3_small, with --channels 3)."""


def _parser() -> argparse.ArgumentParser:
    fmt = {"formatter_class": HelpFormatter}
    p = argparse.ArgumentParser(prog="normscore-finetune", description=_DESCRIPTION, epilog=_EPILOG, **fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("methods", help="list the training methods and their losses", **fmt)

    t = sub.add_parser(
        "train",
        help="train (or resume) one run",
        description="Train (or resume) one run; writes checkpoint.pt while training, and model.pt,\n"
        "model.json (and projection.pt for RNA) when finished.",
        **fmt,
    )
    d = FinetuneConfig()
    t.add_argument(
        "--method", default="rna", choices=list(METHODS), help="training method (see: normscore-finetune methods)"
    )
    t.add_argument("--dataset", default="fashion-mnist", help="registered ID dataset (normscore.data)")
    t.add_argument("--train-split", default="train", help="split of --dataset to train on")
    t.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="use a random subset of N training images (seeded; default: all)",
    )
    t.add_argument(
        "--long-tail",
        type=float,
        default=None,
        metavar="RHO",
        help="long-tail subsample with imbalance RHO, e.g. 0.01 (default: off)",
    )
    t.add_argument(
        "--model", default="smallcnn", metavar="NAME", help="smallcnn[:WIDTH] | a timm name | tv:NAME (torchvision)"
    )
    t.add_argument("--channels", type=int, default=1, help="input channels the images are loaded with")
    t.add_argument("--image-size", type=int, default=28, metavar="PX", help="input size in pixels")
    t.add_argument(
        "--init",
        default=None,
        metavar="RUN_DIR",
        help="start from the weights of a finished run (default: random init)",
    )
    t.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="ID images per step")
    t.add_argument(
        "--ood-batch-size", type=int, default=None, metavar="N",
        help="auxiliary OOD images per step (default: --batch-size; separation: twice --batch-size)",
    )  # fmt: skip
    t.add_argument("--optimizer", default=d.optimizer, choices=["adam", "sgd"], help="adam, or sgd (Nesterov momentum)")
    t.add_argument("--lr", type=float, default=d.lr, help="initial learning rate")
    t.add_argument("--min-lr", type=float, default=d.min_lr, help="final learning rate of the cosine schedule")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    t.add_argument(
        "--schedule", default=d.schedule, choices=["cosine", "constant"], help="learning-rate schedule, per step"
    )
    t.add_argument("--tau", type=float, default=d.tau, help="logit-adjustment strength (la_ce, la_ce_oe, rna)")
    t.add_argument("--rna-lambda", type=float, default=d.rna_lambda, help="weight of the RNA loss")
    t.add_argument("--oe-weight", type=float, default=d.oe_weight, help="weight of the outlier-exposure loss")
    t.add_argument("--sep-weight", type=float, default=d.sep_weight, help="weight of the separation loss")
    t.add_argument("--clu-weight", type=float, default=d.clu_weight, help="weight of the clustering loss")
    t.add_argument("--sep-per-class", action="store_true", help="1/C factor on the separation loss")
    t.add_argument(
        "--feature-loss-start-epoch", type=int, default=None, metavar="EPOCH",
        help="epoch the separation/clustering losses start (default: half of --epochs)",
    )  # fmt: skip
    t.add_argument("--non-affine-bn", action="store_true", help="remove BN gamma/beta (RNA's models)")
    t.add_argument(
        "--keep-affine", nargs="*", default=[], metavar="PATTERN",
        help="with --non-affine-bn: BatchNorm modules whose names match a PATTERN keep gamma/beta",
    )  # fmt: skip
    t.add_argument("--no-augment", action="store_true", help="no random flips and shifts")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, sampling and augmentation")
    t.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also checkpoint every STEPS steps; 0: only at the end of each epoch",
    )
    t.add_argument("--aux-n", type=int, default=20000, metavar="N", help="number of auxiliary OOD crops")
    t.add_argument("--aux-seed", type=int, default=0, help="seed of the auxiliary OOD crops")
    t.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create (required)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    t.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress bar (default: a bar when stderr is a terminal)")

    e = sub.add_parser(
        "eval",
        help="accuracy and OOD metrics of a finished run",
        description="Accuracy (overall, many/medium/few-shot) and, per detector and OOD set, AUROC and\n"
        "FPR95 (ID positive) of a finished run, in %.",
        **fmt,
    )
    e.add_argument("run_dir", help="a run directory written by normscore-finetune train")
    e.add_argument("--dataset", default=None, help="ID test set (default: the run's dataset)")
    e.add_argument("--test-split", default="test", help="split of the ID test set")
    e.add_argument(
        "--ood", nargs="+", default=["mnist-5k", "sklearn-digits", "textures", "noise"], metavar="NAME", help="OOD sets"
    )
    e.add_argument(
        "--detectors",
        nargs="+",
        default=None,
        metavar="NAME",
        help="detectors (default: by method, see docs/finetune.md)",
    )
    e.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (default: no file)")
    e.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    e.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    return p


def default_detectors(method: str) -> list[str]:
    """The matching test-time scores of a method, plus MSP and energy for context."""
    if method == "rna":
        return ["penultimate_norm", "msp", "energy"]
    if method == "separation":
        return ["separation", "msp", "energy"]
    return ["msp", "energy"]


def _train(a: argparse.Namespace) -> int:
    from ..data import get_dataset
    from .aux_ood import aux_ood_dataset
    from .longtail import long_tail_subset

    parsed = cli_model_name(a.model, "normscore-finetune")  # checked before any data is loaded
    if parsed.kind == "local":
        raise _local_model_error(a.model)
    name = parsed.canonical
    cfg = FinetuneConfig.preset(
        a.method,
        epochs=a.epochs,
        batch_size=a.batch_size,
        **({"ood_batch_size": a.ood_batch_size} if a.ood_batch_size else {}),
        optimizer=a.optimizer,
        lr=a.lr,
        min_lr=a.min_lr,
        weight_decay=a.weight_decay,
        schedule=a.schedule,
        tau=a.tau,
        rna_lambda=a.rna_lambda,
        oe_weight=a.oe_weight,
        sep_weight=a.sep_weight,
        clu_weight=a.clu_weight,
        sep_per_class=a.sep_per_class,
        feature_loss_start_epoch=a.feature_loss_start_epoch,
        non_affine_bn=a.non_affine_bn,
        keep_affine=tuple(a.keep_affine),
        augment=not a.no_augment,
        seed=a.seed,
        checkpoint_every=a.checkpoint_every,
    )
    train = get_dataset(a.dataset, a.train_split, channels=a.channels, image_size=a.image_size, limit=a.limit, seed=0)
    counts = None
    data: Any = train
    if a.long_tail is not None:
        data, counts = long_tail_subset(train, a.long_tail)
    aux = aux_ood_dataset(a.aux_n, channels=a.channels, image_size=a.image_size, seed=a.aux_seed)
    num_classes = int(train.labels.max()) + 1
    torch.manual_seed(a.seed)
    model = build_model(name, num_classes, a.channels)
    if a.init:
        load_finetuned(model, a.init)
    meta = {
        "model": name,
        "dataset": a.dataset,
        "train_split": a.train_split,
        "limit": a.limit,
        "long_tail": a.long_tail,
        "channels": a.channels,
        "image_size": a.image_size,
        "init": a.init,
        "aux_ood": {"n": a.aux_n, "seed": a.aux_seed},
    }
    res = finetune(
        model,
        data,
        cfg,
        aux_ood=aux if cfg.uses_ood else None,
        class_counts=counts,
        out_dir=a.out,
        resume=a.resume,
        device=a.device,
        progress=False if a.quiet else None,
        metadata=meta,
    )
    last = res.history[-1] if res.history else {}
    print(json.dumps({"run": a.out, "steps": res.steps, "last_epoch": last}, indent=1))
    return 0


def _eval(a: argparse.Namespace) -> int:
    from ..data import get_dataset
    from .evaluate import accuracy_report, ood_report

    meta = read_run(a.run_dir)
    m = meta.get("metadata", {})
    if "model" not in m:
        raise ConfigError(
            f"{a.run_dir} was not trained by normscore-finetune (no model spec in model.json); "
            "evaluate it from Python with normscore.finetune.accuracy_report / ood_report."
        )
    ch, size = int(m["channels"]), int(m["image_size"])
    # runs written before the one model-name format hold old spellings: accepted silently
    model = build_model(parse_model_name(m["model"], warn=False).canonical, int(meta["num_classes"]), ch)
    load_finetuned(model, a.run_dir, device=a.device)
    test = get_dataset(a.dataset or m["dataset"], a.test_split, channels=ch, image_size=size)
    acc = accuracy_report(model, test, meta["class_counts"])
    dets = a.detectors or default_detectors(meta["config"]["method"])
    oods = {n: get_dataset(n, "test", channels=ch, image_size=size) for n in a.ood}
    rep = ood_report(model, test, oods, dets)
    print(f"run {a.run_dir}: method {meta['config']['method']}, model {m['model']}")
    print(
        "accuracy: "
        + ", ".join(f"{k} {100 * acc[k]:.2f}" for k in ("overall", "many", "medium", "few"))
        + f"  (train counts {meta['class_counts']})"
    )
    sets = [*a.ood, "mean"]
    print(f"{'detector':<18}" + "".join(f"{s[:14]:>16}" for s in sets) + "   (AUROC / FPR95, ID positive, %)")
    for d in dets:
        cells = [f"{100 * rep[d][s]['auroc']:6.2f}/{100 * rep[d][s]['fpr95']:6.2f}" for s in sets]
        print(f"{d:<18}" + "".join(f"{c:>16}" for c in cells))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"run": a.run_dir, "accuracy": acc, "ood": rep}, f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``normscore-finetune`` (returns the exit code)."""
    a = _parser().parse_args(argv)
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    try:
        if a.command == "methods":
            for k in METHODS:
                print(f"{k:<11} {_METHOD_HELP[k]}")
            return 0
        if a.command == "train":
            return _train(a)
        return _eval(a)
    except NormscoreError as e:
        print(f"normscore-finetune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
