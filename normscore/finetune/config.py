"""What one fine-tuning run trains: the methods' loss terms (:data:`METHODS`) and the run's
hyperparameters (:class:`FinetuneConfig`, JSON-serialisable, checked on construction). The loop
that runs them is :func:`normscore.finetune.finetune`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError, did_you_mean

__all__ = ["METHODS", "FinetuneConfig", "Method"]


@dataclass(frozen=True)
class Method:
    """Which loss terms and batch rows a training method uses."""

    logit_adjusted: bool = False  # logit-adjusted cross-entropy (else plain CE)
    outlier_exposure: bool = False  # the OE term on auxiliary OOD rows
    ood_rows: bool = False  # auxiliary OOD rows in the batch
    rna: bool = False  # the RNA term
    feature_terms: bool = False  # PFS's separation/clustering feature terms


#: method name -> the terms it uses
METHODS: dict[str, Method] = {
    "ce": Method(),
    "la_ce": Method(logit_adjusted=True),
    "ce_oe": Method(outlier_exposure=True, ood_rows=True),
    "la_ce_oe": Method(logit_adjusted=True, outlier_exposure=True, ood_rows=True),
    "rna": Method(logit_adjusted=True, ood_rows=True, rna=True),
    "separation": Method(outlier_exposure=True, ood_rows=True, feature_terms=True),
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one training run (JSON-serialisable; see the module docstring).

    Defaults follow the official RNA CIFAR recipe where it applies (Adam, lr 1e-3, wd 5e-4,
    cosine decay, ``tau = 1``, ``lambda = 0.5``, projection ``D -> D -> 128``) and PFS for the
    separation terms (``oe_weight = 0.5``, unit weights for ``L_Sep``/``L_Clu``, no ``1/C``
    factor, switched on halfway through). The learning rate follows a cosine from ``lr`` to
    ``min_lr`` **per step** (RNA steps its cosine per epoch; the difference is negligible).
    """

    method: str = "rna"
    epochs: int = 10
    batch_size: int = 128
    ood_batch_size: int | None = None  # None: = batch_size (PFS's CIFAR recipe uses 2x)
    optimizer: str = "adam"  # "adam" | "sgd" (Nesterov, momentum)
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"  # "cosine" | "constant"
    tau: float = 1.0
    rna_lambda: float = 0.5
    projection_dim: int = 128
    projection_hidden: int | None = None  # None: = feature dim
    oe_weight: float = 0.5
    sep_weight: float = 1.0
    clu_weight: float = 1.0
    sep_per_class: bool = False
    feature_loss_start_epoch: int | None = None  # None: epochs // 2 (PFS CIFAR: 25 of 50)
    non_affine_bn: bool = False
    keep_affine: tuple[str, ...] = ()
    augment: bool = True
    augment_shift: int = 2
    augment_flip: bool = True
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: only at the end of each epoch

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_affine", tuple(self.keep_affine))
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown method {self.method!r}.{did_you_mean(self.method, METHODS)} Choose one of {list(METHODS)}."
            )
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.ood_batch_size is None or self.ood_batch_size >= 1, "ood_batch_size must be >= 1"),
            (self.optimizer in ("adam", "sgd"), "optimizer must be 'adam' or 'sgd'"),
            (self.schedule in ("cosine", "constant"), "schedule must be 'cosine' or 'constant'"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.tau >= 0, "tau must be >= 0"),
            (self.projection_dim >= 1, "projection_dim must be >= 1"),
            (self.augment_shift >= 0, "augment_shift must be >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (
                self.feature_loss_start_epoch is None or self.feature_loss_start_epoch >= 0,
                "feature_loss_start_epoch must be >= 0",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"FinetuneConfig: {msg}.")

    # ------------------------------------------------------------------ what the method uses
    @property
    def uses_la(self) -> bool:
        return METHODS[self.method].logit_adjusted

    @property
    def uses_oe(self) -> bool:
        return METHODS[self.method].outlier_exposure

    @property
    def uses_ood(self) -> bool:
        return METHODS[self.method].ood_rows

    @property
    def uses_rna(self) -> bool:
        return METHODS[self.method].rna

    @property
    def uses_features(self) -> bool:
        return METHODS[self.method].feature_terms

    @property
    def start_epoch_features(self) -> int:
        return self.epochs // 2 if self.feature_loss_start_epoch is None else self.feature_loss_start_epoch

    @property
    def effective_ood_batch_size(self) -> int:
        return self.batch_size if self.ood_batch_size is None else self.ood_batch_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_affine"] = list(self.keep_affine)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"FinetuneConfig has no field(s) {unknown}.")
        return cls(**d)

    @classmethod
    def preset(cls, method: str, **overrides: Any) -> FinetuneConfig:
        """The paper defaults of ``method`` (PFS: OOD batch twice the ID batch), then ``overrides``."""
        base: dict[str, Any] = {"method": method}
        if method == "separation":
            base["ood_batch_size"] = 2 * int(overrides.get("batch_size", cls.batch_size))
        base.update(overrides)
        return cls(**base)
