"""What a benchmark run is asked to do: :class:`BenchConfig` (the CLI flags), :class:`SplitRef`
(one data split), :func:`trains_model` and :func:`resolve_device`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..tools.model_names import parse_model_name
from .suites import SUITES

__all__ = ["BenchConfig", "SplitRef", "resolve_device", "trains_model"]


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

    def __post_init__(self) -> None:
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


def trains_model(cfg: BenchConfig) -> bool:
    """Whether the run trains its model here (``--train-epochs``, or ``smallcnn`` without a
    checkpoint) rather than loading pretrained or checkpoint weights."""
    suite = SUITES.get(cfg.id)
    kind = parse_model_name(cfg.model or (suite.model if suite else "smallcnn"), check=False).kind
    return cfg.train_epochs is not None or (kind == "smallcnn" and not cfg.checkpoint)


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
