"""``normscore-bench``: benchmark every registered OOD detector on a model, offline.

With no arguments it runs the embedded default: Fashion-MNIST as ID, ``smallcnn`` (width 16)
trained on its 60,000 training images for 3 epochs on one CPU thread, bitwise reproducibly
(cached after the first run), detectors
fitted on 10,000 training images (500 for detectors that need the model live, such as ODIN and
LDG), evaluated on 1,000 ID test images against at most 1,000 images of each near-OOD
(mnist-5k, opencv-digits, sklearn-digits) and far-OOD (textures, photos, noise) set, all
registered detectors. See docs/benchmarks.md.

Exit status: 0 on success, 1 when some detectors failed (their rows say ``err``; the reasons are
printed and in results.json), 2 on a usage error or missing data/weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from typing import TYPE_CHECKING

import torch

from ..errors import NormscoreError
from ..tools.cli_help import HelpFormatter
from ..tools.model_names import cli_model_name

if TYPE_CHECKING:
    from .runner import BenchConfig, BenchResult

__all__ = ["build_parser", "main"]


def _list_arg(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = []
    for v in values:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out or None


def _sizes(field: str) -> str:
    """The suites' defaults of one size, read from :data:`SUITES` (``None`` = every image)."""
    from .suites import SUITES

    return ", ".join(
        f"{s.key} {'all' if getattr(s, field) is None else f'{getattr(s, field):,}'}" for s in SUITES.values()
    )


def _epilog() -> str:
    from .suites import SUITES

    lines = ["suites (--id NAME, or --suite NAME, with its default model, sizes and OOD sets):"]
    for s in SUITES.values():
        fit = "all" if s.fit_size is None else f"{s.fit_size:,}"
        live = fit if s.live_fit_size is None else f"{s.live_fit_size:,}"
        test = "all" if s.test_size is None else f"at most {s.test_size:,}"
        head = f"  {s.id}: model {s.model}" if s.key == s.id else f"  --suite {s.key} (ID {s.id}): model {s.model}"
        lines.append(head)
        if s.description:
            lines.append(f"    {s.description}")
        lines += [
            f"    detectors fitted on {fit} {s.train_split} images ({live} for live detectors)",
            f"    tested on {test} images of each test set (the ID {s.test_split} split, every OOD set)",
            f"    near-OOD {', '.join(s.near)}; far-OOD {', '.join(s.far)}",
        ]
    lines.append("Without arguments: the fashion-mnist suite, its small CNN trained on the CPU (cached).")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="normscore-bench",
        description="Benchmark post-hoc OOD detectors on a classifier, offline (see docs/benchmarks.md).",
        epilog=_epilog(),
        formatter_class=HelpFormatter,
    )
    g = ap.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="NAME",
        help="smallcnn[:WIDTH] | efficientnet_lite0 | a timm name (resnet50) | tv:NAME (torchvision) "
        "(default: the suite's model)",
    )
    g.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="state_dict to load (torch.save(model.state_dict()) or .safetensors; default: pretrained weights "
        "on disk, or training for smallcnn)",
    )
    g.add_argument(
        "--train-epochs",
        type=int,
        metavar="N",
        help="train the model from scratch on the ID training split, cached by recipe; with a suite that "
        "trains a new head (fashion-mnist-effnet): the head's epochs (default: smallcnn and such suites "
        "train for the suite's epochs, others load weights)",
    )
    g.add_argument(
        "--image-size", type=int, metavar="PX", help="input size override (default: the model's or the data's size)"
    )
    g = ap.add_argument_group("data")
    g.add_argument(
        "--id",
        help="ID data set (fashion-mnist, imagenet, imagefolder:PATH, ...) (default: fashion-mnist, or the --suite's)",
    )
    g.add_argument(
        "--suite",
        metavar="NAME",
        help="a named suite: its ID set, model, input size and sizes (fashion-mnist-effnet: ImageNet "
        "EfficientNet-Lite0 with a new linear head on fashion-mnist, 64 px) (default: the suite of --id)",
    )
    g.add_argument(
        "--ood",
        action="append",
        metavar="LIST",
        help="OOD sets, comma-separated (NAME or NAME@SPLIT) (default: the suite's near and far sets)",
    )
    g.add_argument(
        "--near", action="append", metavar="LIST", help="near-OOD sets, comma-separated (default: the suite's)"
    )
    g.add_argument(
        "--far", action="append", metavar="LIST", help="far-OOD sets, comma-separated (default: the suite's)"
    )
    g.add_argument(
        "--val-ood",
        metavar="NAME",
        help="validation OOD set for --search (default: the suite's), or 'pseudo': no OOD data, pseudo-OOD made "
        "from ID training images (normscore.select)",
    )
    g.add_argument(
        "--data-root",
        metavar="DIR",
        help="folder of local data, e.g. ImageNet (default: $NORMSCORE_IMAGENET_ROOT; see normscore.data.imagenet)",
    )
    g.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="subsample every split (training, fit, test, OOD) to at most N images (default: no limit)",
    )
    g.add_argument(
        "--fit-size",
        type=int,
        metavar="N",
        help=f"ID training images to fit detectors on (default: the suite's: {_sizes('fit_size')})",
    )
    g.add_argument(
        "--live-fit-size",
        type=int,
        metavar="N",
        help="ID training images for detectors that need the model live, ODIN, LDG, ... (default: the "
        f"suite's: {_sizes('live_fit_size')})",
    )
    g.add_argument(
        "--test-size",
        type=int,
        metavar="N",
        help=f"cap on every test split, ID and OOD (default: the suite's: {_sizes('test_size')})",
    )
    g.add_argument("--val-size", type=int, default=1000, metavar="N", help="validation ID / OOD images for --search")
    g = ap.add_argument_group("detectors")
    g.add_argument("--detectors", default="all", metavar="LIST", help="all, or a comma-separated list (see --list)")
    g.add_argument(
        "--search",
        action="store_true",
        help="hyperparameter search on validation ID vs validation OOD (or pseudo-OOD: --val-ood pseudo)",
    )
    g = ap.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per model pass")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    g.add_argument("--workers", type=int, default=0, metavar="N", help="data loader worker processes")
    g.add_argument("--seed", type=int, default=0, help="seed of subsampling and training")
    g.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="train the model N times (training seeds SEED..SEED+N-1, the same data) and report mean +- std per cell",
    )
    g.add_argument(
        "--cache-dir", metavar="DIR", help="feature/model cache (default $NORMSCORE_CACHE_DIR or ~/.cache/normscore)"
    )
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    g = ap.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="output folder (default normscore-results/<id>-<model>)")
    g.add_argument("--format", default="table", choices=("table", "markdown", "csv", "json"), help="what to print")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or log lines (default: log lines; progress bars when stderr is a terminal)",
    )
    g.add_argument("--list", action="store_true", help="list data sets, detectors and local models, then exit")
    return ap


def _print_lists() -> None:
    import normscore
    from normscore.data import dataset_info, list_dataset_prefixes, list_datasets
    from normscore.tools.zoo import list_local_models

    from .suites import SUITES

    print("data sets:")
    for n in list_datasets():
        info = dataset_info(n)
        sp = list(info.splits) if len(info.splits) <= 8 else [*info.splits[:6], f"... ({len(info.splits)} splits)"]
        print(f"  {n:16s} {info.description}  [splits: {', '.join(sp)}]")
    for p, d in list_dataset_prefixes().items():
        print(f"  {p + ':PATH':16s} {d}")
    print("suites (--id NAME, or --suite NAME, with default OOD sets):")
    for s in SUITES.values():
        print(
            f"  {s.key:16s} ID {s.id}; near {', '.join(s.near)}; far {', '.join(s.far)}; val-OOD {s.val_ood}; model {s.model}"
        )
    print("detectors:")
    for n in normscore.list_detectors():
        c = normscore.detector_class(n)
        print(f"  {n:20s} {c.paper}")
    print("models: smallcnn[:WIDTH], " + ", ".join(list_local_models()) + ", any timm name, tv:<torchvision name>")


def _default_out(id_name: str, model: str | None, suite: str | None = None) -> str:
    from .suites import SUITES

    key = suite or id_name
    m = model or (SUITES[key].model if key in SUITES else "smallcnn")
    ident = id_name.partition(":")[2] if id_name.startswith("imagefolder:") else id_name
    ident = os.path.basename(os.path.normpath(ident)) or "data"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{ident}-{m}")
    return os.path.join("normscore-results", safe)


def _config(args: argparse.Namespace, argv: list[str] | None) -> BenchConfig:
    """The :class:`BenchConfig` of the parsed command line."""
    from .runner import BenchConfig

    return BenchConfig(
        id=args.id,
        suite=args.suite,
        model=args.model,
        checkpoint=args.checkpoint,
        train_epochs=args.train_epochs,
        ood=_list_arg(args.ood),
        near=_list_arg(args.near),
        far=_list_arg(args.far),
        val_ood=args.val_ood,
        detectors=args.detectors,
        data_root=args.data_root,
        limit=args.limit,
        fit_size=args.fit_size,
        live_fit_size=args.live_fit_size,
        test_size=args.test_size,
        val_size=args.val_size,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        out=args.out or _default_out(args.id, args.model, args.suite),
        cache_dir=args.cache_dir,
        no_cache=args.no_cache,
        search=args.search,
        image_size=args.image_size,
        workers=args.workers,
        plots=not args.no_plots,
        progress=False if args.quiet else None,
        command=shlex.join(["normscore-bench", *(sys.argv[1:] if argv is None else argv)]),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``normscore-bench``."""
    args = build_parser().parse_args(argv)
    if args.list:
        _print_lists()
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from .report import footer_lines, format_results, summary_lines
    from .runner import run_benchmark

    if args.model:
        try:
            args.model = cli_model_name(args.model, "normscore-bench").canonical
        except NormscoreError as e:
            print(f"normscore-bench: error: {e}", file=sys.stderr)
            return 2
    for flag in (
        "limit",
        "fit_size",
        "live_fit_size",
        "test_size",
        "val_size",
        "batch_size",
        "train_epochs",
        "image_size",
        "seeds",
    ):
        v = getattr(args, flag)
        if v is not None and v < 1:
            print(f"normscore-bench: error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from .suites import SUITES

    if args.suite is not None and args.suite in SUITES and args.id is None:
        args.id = SUITES[args.suite].id
    args.id = args.id or "fashion-mnist"
    try:
        cfg = _config(args, argv)
    except NormscoreError as e:
        print(f"normscore-bench: error: {e}", file=sys.stderr)
        return 2
    try:
        res = run_benchmark(cfg) if args.seeds == 1 else _run_seeds(cfg, args.seeds)
    except NormscoreError as e:
        print(f"normscore-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("normscore-bench: interrupted; finished splits are cached and a new run resumes.", file=sys.stderr)
        return 130
    r = res.results
    text = format_results(r, args.format)
    if args.format in ("table", "markdown"):
        print("\n".join(summary_lines(r)))
        print()
        print(text)
        print()
        print("\n".join(footer_lines(r)))
        print(
            f"outputs: {res.out_dir}/ (results.csv, results.json, scores.npz, table.txt{', plots/' if cfg.plots else ''})"
        )
    else:
        print(text)
        if not args.quiet:
            print(f"outputs: {res.out_dir}/", file=sys.stderr)
    return 1 if res.failed else 0


def _run_seeds(cfg: BenchConfig, n: int) -> BenchResult:
    """``--seeds N``: one run per training seed into ``<out>/seed-<s>/``, merged into ``<out>``."""
    from ..errors import ConfigError
    from .report import write_outputs
    from .runner import BenchResult, run_benchmark, trains_model
    from .seeds import merge_seed_results

    if not trains_model(cfg):
        raise ConfigError(
            "--seeds N trains the model N times, but this model is not trained here (pretrained or "
            "--checkpoint weights). Use --train-epochs E to train it from scratch, or drop --seeds."
        )
    runs = []
    for s in range(cfg.seed, cfg.seed + n):
        out = os.path.join(cfg.out, f"seed-{s}") if cfg.out else None
        if cfg.progress:
            print(f"normscore-bench: training seed {s} ({s - cfg.seed + 1} of {n})", file=sys.stderr)
        runs.append(run_benchmark(dataclasses.replace(cfg, train_seed=s, out=out)))
    merged = BenchResult(merge_seed_results([r.results for r in runs]), {}, cfg.out)
    if cfg.out is not None:
        write_outputs(merged, cfg.out, plots=cfg.plots, progress=cfg.progress)
    return merged


if __name__ == "__main__":
    raise SystemExit(main())
