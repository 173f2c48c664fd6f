"""Step 1 of a benchmark run: which splits it reads (:func:`plan_splits`: the ID train/test
splits, the OOD sets by near/far group, the validation OOD set of ``--search``) and how each
detector runs (:func:`plan_detectors`: cached on stored features, or live with the model)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters import Adapter
from ..data import DatasetInfo, dataset_info
from ..detectors.base import Detector
from ..detectors.registry import create, detector_class, list_detectors
from ..errors import ConfigError, NotApplicableError
from .config import BenchConfig, SplitRef, suite_of
from .suites import SUITES, Suite

__all__ = ["PSEUDO_VAL_OOD", "DetectorRun", "SplitPlan", "plan_detectors", "plan_splits", "short_error"]

#: the ``--val-ood`` value that searches with pseudo-OOD from ID data (:func:`normscore.select`)
PSEUDO_VAL_OOD = "pseudo"


@dataclass
class SplitPlan:
    """The splits of a run (resolved from the config and the suite)."""

    suite: Suite | None
    info: DatasetInfo
    train_split: str
    test_split: str
    ood_refs: list[SplitRef]
    val_ref: SplitRef | None = None  # the validation OOD set (``--search`` only)
    val_reason: str = ""
    pseudo_ood: bool = False  # ``--search --val-ood pseudo``: select with pseudo-OOD (normscore.select)


@dataclass
class DetectorRun:
    """Everything about one detector in one run."""

    name: str
    mode: str = "cached"  # "cached" or "live"
    why_live: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    search: list[dict[str, Any]] = field(default_factory=list)
    det: Detector | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    not_applicable: bool = False  # error is the NotApplicableError of a detector this model cannot run
    info: dict[str, Any] = field(default_factory=dict)


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def _display_name(token: str) -> str:
    if token.startswith("imagefolder:"):
        return os.path.basename(os.path.normpath(token.partition(":")[2])) or token
    return token


def _parse_ref(token: str, id_name: str, id_splits: tuple[str, ...], reserved: tuple[str, ...]) -> tuple[str, str]:
    """``(dataset, split)`` of an OOD token: an OOD split of the ID set (imagenet), ``name`` or
    ``name@split``."""
    if token in id_splits and token not in reserved:
        return id_name, token
    name, _, split = token.partition("@")
    info = dataset_info(name)
    if not split:
        split = "test" if "test" in info.splits else next((s for s in info.splits if s != "train"), info.splits[0])
    if split not in info.splits:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; it has {list(info.splits)[:12]}.")
    return name, split


def plan_splits(cfg: BenchConfig) -> SplitPlan:
    """Resolve the suite, the ID splits, the OOD sets and (with ``search``) the validation OOD set."""
    s = suite_of(cfg)
    if cfg.id in SUITES and SUITES[cfg.id].key != SUITES[cfg.id].id:
        raise ConfigError(f"{cfg.id} is a suite, not a data set: use --suite {cfg.id}.")
    info = dataset_info(cfg.id)
    splits = info.splits
    train_split = s.train_split if s else ("train" if "train" in splits else None)
    if train_split is None or train_split not in splits:
        raise ConfigError(f"--id {cfg.id} has no 'train' split to fit the detectors on (splits: {list(splits)[:8]}).")
    test_split = s.test_split if s else next((x for x in ("test", "val") if x in splits), None)
    if test_split is None:
        raise ConfigError(f"--id {cfg.id} has no 'test' or 'val' split to evaluate on.")
    reserved = (train_split, test_split)
    near = list(cfg.near or [])
    far = list(cfg.far or [])
    other = list(cfg.ood or [])
    if not (near or far or other):
        if s is None:
            raise ConfigError(f"--id {cfg.id} has no default OOD sets; name them with --ood (or --near/--far).")
        near, far = list(s.near), list(s.far)
    refs: list[SplitRef] = []
    seen: set[str] = set()
    for group, tokens in (("near", near), ("far", far), ("other", other)):
        for t in tokens:
            ds, sp = _parse_ref(t, cfg.id, splits, reserved)
            g = group
            if group == "other" and s is not None:
                g = "near" if t in s.near else "far" if t in s.far else "other"
            label = _display_name(t)
            if label in seen:
                raise ConfigError(f"OOD set {t!r} is given twice.")
            if (ds, sp) == (cfg.id, test_split) or (ds, sp) == (cfg.id, train_split):
                raise ConfigError(f"OOD set {t!r} is the ID data itself.")
            seen.add(label)
            refs.append(SplitRef(label, ds, sp, g))
    val_ref: SplitRef | None = None
    val_reason = ""
    if cfg.search:
        token = cfg.val_ood or (s.val_ood if s else None)
        if not token:
            raise ConfigError(
                f"--search needs a validation OOD set for --id {cfg.id}: pass --val-ood NAME (or --val-ood "
                f"{PSEUDO_VAL_OOD}: pseudo-OOD made from ID training images)."
            )
        if token == PSEUDO_VAL_OOD:
            return SplitPlan(
                s,
                info,
                train_split,
                test_split,
                refs,
                None,
                "pseudo-OOD made from held-out ID training images (normscore.select): no OOD data",
                True,
            )
        ds, sp = _parse_ref(token, cfg.id, splits, reserved)
        clash = [r.label for r in refs if (r.dataset, r.split) == (ds, sp)]
        if clash:
            raise ConfigError(
                f"the validation OOD set {token!r} is also a test OOD set ({clash[0]}); the search must "
                "use an OOD set disjoint from every test set. Pick another --val-ood."
            )
        val_ref = SplitRef(_display_name(token), ds, sp, "val-ood")
        val_reason = s.val_ood_reason if (s and token == s.val_ood) else "given with --val-ood (not a test OOD set)"
    return SplitPlan(s, info, train_split, test_split, refs, val_ref, val_reason)


def plan_detectors(
    spec: str | list[str], model: torch.nn.Module, adapter: Adapter, log: Callable[[str], None]
) -> list[DetectorRun]:
    """One :class:`DetectorRun` per selected detector, with its mode (cached or live); a
    detector that cannot be set up gets its error and the others still run."""
    if isinstance(spec, str):
        names = list_detectors() if spec.strip() in ("all", "") else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    if not names:
        raise ConfigError("no detectors selected.")
    for n in names:
        detector_class(n)  # unknown names fail early, with suggestions
    if len(set(names)) != len(names):
        raise ConfigError(f"a detector is listed twice in --detectors: {names}.")
    runs = []
    for n in names:
        r = DetectorRun(n)
        try:
            det = create(n).attach(model, adapter)
            r.mode, r.why_live = detector_mode(det, adapter)
            r.info = {
                k: v
                for k, v in type(det).info().items()
                if k in ("paper", "needs_labels", "needs_fit", "feature_only", "needs_gradients")
            }
        except NotApplicableError as e:
            r.error, r.not_applicable = short_error(e), True
            log(f"detector {n}: not applicable to this model: {r.error}")
        except Exception as e:  # noqa: BLE001 - one broken detector must not stop the run
            r.error = short_error(e)
            log(f"detector {n}: cannot be set up: {r.error}")
        runs.append(r)
    return runs


def detector_mode(det: Detector, adapter: Adapter) -> tuple[str, str]:
    """``("cached", "")``, or ``("live", why)`` for a detector that needs the model itself."""
    if not det.feature_only:
        return "live", "feature_only=False (needs the model at score time)"
    if det.fit_mode == "multi_pass":
        return "live", "several fit passes"
    if det.fit_mode == "single_pass":
        fs = det.capture_spec(adapter, "fit")
        if fs is not None and fs.backward is not None:
            return "live", "gradients during fit"
    try:
        ss = det.capture_spec(adapter, "score")
    except Exception:  # noqa: BLE001 - the score spec may depend on fitted state
        ss = None
    if ss is not None and ss.backward is not None:
        return "live", "gradients at score time"
    return "cached", ""
