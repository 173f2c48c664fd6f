"""What a benchmark run is asked to do: :class:`BenchConfig` (the CLI flags), :class:`SplitRef`
(one data split), :func:`trains_model` and :func:`resolve_device`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, did_you_mean
from ..tools.model_names import parse_model_name
from .suites import SUITES, Suite

__all__ = ["BenchConfig", "SplitRef", "resolve_device", "retrains_head", "suite_of", "trains_model"]


@dataclass
class BenchConfig:
    """Options of one benchmark run (the CLI flags; ``None`` = the suite's default)."""

    id: str = "fashion-mnist"
    model: str | None = None
    checkpoint: str | None = None
    train_epochs: int | None = None
    ood: list[str] | None = None
    near: list[str] | None = None
    far: list[str] | None = None
    val_ood: str | None = None
    detectors: str | list[str] = "all"
    data_root: str | None = None
    limit: int | None = None
    fit_size: int | None = None
    test_size: int | None = None
    live_fit_size: int | None = None
    val_size: int = 1000
    batch_size: int = 256
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    cache_dir: str | None = None
    no_cache: bool = False
    search: bool = False
    image_size: int | None = None
    workers: int = 0
    train_seed: int | None = None  # seed of the model's initialisation and training (None: seed)
    lr: float = 0.1
    train_batch_size: int = 128
    plots: bool = True
    progress: bool | None = None  # log lines unless False; bars if True, or None and stderr is a terminal
    part_rows: int = 4096
    command: str | None = None  # the command line, recorded in results.json
    suite: str | None = None  # a named suite (``--suite``; None: the suite of ``id``, if any)

    def __post_init__(self) -> None:
        if self.suite is not None:
            if self.suite not in SUITES:
                raise ConfigError(
                    f"unknown suite {self.suite!r}.{did_you_mean(self.suite, SUITES)} Suites: {list(SUITES)}."
                )
            if self.id != SUITES[self.suite].id:
                raise ConfigError(
                    f"suite {self.suite} has ID set {SUITES[self.suite].id}, not {self.id}; drop --id or --suite."
                )
        # a comma-separated string is a list of sets (as on the command line), not a sequence of letters
        for f in ("ood", "near", "far"):
            v = getattr(self, f)
            if isinstance(v, str):
                setattr(self, f, [s.strip() for s in v.split(",") if s.strip()])


@dataclass(frozen=True)
class SplitRef:
    """One data split of the benchmark: shown as ``label``, loaded as ``dataset``/``split``."""

    label: str
    dataset: str
    split: str
    group: str  # "near", "far", "other" (test OOD), "id", "val-id", "val-ood"


def suite_of(cfg: BenchConfig) -> Suite | None:
    """The run's suite: ``cfg.suite``, else the suite named after the ID set (if any)."""
    if cfg.suite is not None:
        return SUITES[cfg.suite]
    s = SUITES.get(cfg.id)
    return s if s is not None and s.key == s.id else None


def retrains_head(cfg: BenchConfig) -> bool:
    """Whether the run trains a new linear head on its suite's frozen pretrained model
    (:mod:`normscore.bench.probe`): the suite says so, and neither ``--model`` (another one) nor
    ``--checkpoint`` replaces its model."""
    s = suite_of(cfg)
    if s is None or s.retrain != "head" or cfg.checkpoint:
        return False
    return cfg.model is None or parse_model_name(cfg.model, check=False).canonical == s.model


def trains_model(cfg: BenchConfig) -> bool:
    """Whether the run trains its model here (``--train-epochs``, ``smallcnn`` without a
    checkpoint, or a suite's new head) rather than loading pretrained or checkpoint weights."""
    suite = suite_of(cfg)
    kind = parse_model_name(cfg.model or (suite.model if suite else "smallcnn"), check=False).kind
    return cfg.train_epochs is not None or (kind == "smallcnn" and not cfg.checkpoint) or retrains_head(cfg)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is available; use --device cpu.")
    return dev
