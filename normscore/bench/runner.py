"""The benchmark run behind ``normscore-bench``: data, model, features, detectors, metrics.

Order of work (each step shows a progress bar):

1. resolve the suite, the OOD sets and (with ``search``) the validation sets;
2. build the model - load it, or train it on the ID training split (cached by recipe);
3. fit split - ``fit_size`` ID training images; with ``search`` also ``val_size`` other training
   images as validation ID (disjoint from the fit images) and the validation OOD set;
4. **cached detectors** (``feature_only`` and no gradients): features are captured once per
   split through :class:`~normscore.bench.cache.FeatureCache` (the union of what every
   detector needs, so adding detectors later only captures the missing keys), fitted with
   ``fit_features`` on the fit split and scored with ``score_features``;
5. **live detectors** (``feature_only=False``, e.g. ODIN's input perturbation or LDG's
   gradients, or several fit passes): fitted with ``fit(model, loader)`` and scored with
   ``score(x)`` batch by batch - their own model passes; their scores are cached per split;
6. hyperparameter search (``search``): every combination of a detector's ``search_space`` is
   fitted and scored on validation ID vs validation OOD; the highest AUROC wins (ties: the
   first in grid order); the chosen values are used on the test sets and recorded;
7. metrics (:func:`normscore.metrics.evaluate`) per OOD set, means over near/far OOD, ID
   accuracy from the cached logits.

Detectors are fitted on all fit images (``calibration=0``: no threshold hold-out, since the
benchmark needs scores, not decisions); detectors without statistics are only attached.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..adapters import Adapter, get_adapter
from ..data import ImageSet, check_dataset, dataset_info, get_dataset
from ..detectors.base import Detector
from ..detectors.registry import create, detector_class, list_detectors
from ..errors import CalibrationWarning, ConfigError, MissingResourceError
from ..files import atomic_write
from ..metrics import METRICS, evaluate
from ..progress import progress_bar
from ..taps import Features
from ..tools.model_names import parse_model_name
from .cache import FeatureCache, spec_keys
from .models import InputFormat, LoadedModel, build_model, train_cached, weights_hash, weights_problem
from .report import write_json, write_outputs
from .result import BenchResult
from .suites import SUITES, Suite

__all__ = ["BenchConfig", "BenchResult", "SplitRef", "run_benchmark", "trains_model"]

FEATURE_CHUNK = 4096


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
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# small helpers


def _log_fn(progress: bool | None) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if progress is not False:
            print(f"[normscore-bench] {msg}", file=sys.stderr, flush=True)

    return log


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


def _chunks(feats: Features, n: int, size: int = FEATURE_CHUNK) -> list[Features]:
    return [feats.select(slice(i, i + size)) for i in range(0, n, size)] if n else []


def _grid(space: dict[str, list]) -> list[dict[str, Any]]:
    if not space:
        return [{}]
    keys = list(space)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(space[k] for k in keys))]


def _versions() -> dict[str, str]:
    out = {
        "normscore": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    for mod in ("torchvision", "timm", "faiss", "sklearn"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:  # noqa: BLE001 - optional
            out[mod] = "not installed"
    return out


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
        return _json_safe(v.item())
    return v


def missing_error(problems: list[tuple[str, str]], *, ran: bool) -> MissingResourceError:
    """One error listing every ``(what, problem)``; splits with the same problem are grouped and
    a shared explanation (the lines after a problem's first, e.g. a data layout) is said once."""
    groups: dict[str, list[str]] = {}
    for what, msg in problems:
        groups.setdefault(msg, []).append(what)
    lines, notes = [], []
    for msg, whats in groups.items():
        first, _, rest = msg.partition("\n")
        label = whats[0] if len(whats) == 1 else _group_label(whats)
        lines.append(f"  - {label + ': ' if label else ''}{first}")
        if rest.strip() and rest not in notes:
            notes.append(rest)
    n = len(lines)
    head = f"{n} missing piece{'s' if n != 1 else ''}" + ("" if ran else "; nothing was run")
    return MissingResourceError("\n".join([f"{head}:", *lines, *notes]))


def _group_label(whats: list[str]) -> str:
    """``data imagenet:train, val, ...`` for several splits of one data set."""
    sets = [w.removeprefix("data ").partition(":") for w in whats]
    if all(w.startswith("data ") for w in whats) and len({d for d, _, _ in sets}) == 1:
        return f"data {sets[0][0]}:{', '.join(sp for _, _, sp in sets)}"
    return ", ".join(whats)


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


# ---------------------------------------------------------------------------------------------
# the run


class _Run:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.train_seed = cfg.seed if cfg.train_seed is None else cfg.train_seed
        self.log = _log_fn(cfg.progress)
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # process CPU seconds (all threads) of the same stages
        self.split_info: dict[str, dict[str, Any]] = {}
        if cfg.no_cache:
            self.cache_root = None
        else:
            from ..data import cache_dir

            self.cache_root = os.path.abspath(cfg.cache_dir) if cfg.cache_dir else cache_dir()
        self.fcache = FeatureCache(self.cache_root, part_rows=cfg.part_rows)

    @contextlib.contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        """Record the wall-clock and process-CPU seconds of a stage (added up if repeated)."""
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._add(name, t0, c0)

    def _add(self, name: str, t0: float, c0: float) -> None:
        """Add wall-clock and process-CPU seconds since ``(t0, c0)`` to stage ``name``."""
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0

    # ------------------------------------------------------------------ set-up
    def resolve(self) -> None:
        cfg = self.cfg
        self.suite: Suite | None = SUITES.get(cfg.id)
        self.info = dataset_info(cfg.id)
        splits = self.info.splits
        s = self.suite
        self.train_split = s.train_split if s else ("train" if "train" in splits else None)
        if self.train_split is None or self.train_split not in splits:
            raise ConfigError(
                f"--id {cfg.id} has no 'train' split to fit the detectors on (splits: {list(splits)[:8]})."
            )
        self.test_split = s.test_split if s else next((x for x in ("test", "val") if x in splits), None)
        if self.test_split is None:
            raise ConfigError(f"--id {cfg.id} has no 'test' or 'val' split to evaluate on.")
        reserved = (self.train_split, self.test_split)
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
                if (ds, sp) == (cfg.id, self.test_split) or (ds, sp) == (cfg.id, self.train_split):
                    raise ConfigError(f"OOD set {t!r} is the ID data itself.")
                seen.add(label)
                refs.append(SplitRef(label, ds, sp, g))
        self.ood_refs = refs
        self.val_ref: SplitRef | None = None
        self.val_reason = ""
        if cfg.search:
            token = cfg.val_ood or (s.val_ood if s else None)
            if not token:
                raise ConfigError(f"--search needs a validation OOD set for --id {cfg.id}: pass --val-ood NAME.")
            ds, sp = _parse_ref(token, cfg.id, splits, reserved)
            clash = [r.label for r in refs if (r.dataset, r.split) == (ds, sp)]
            if clash:
                raise ConfigError(
                    f"the validation OOD set {token!r} is also a test OOD set ({clash[0]}); the search must "
                    "use an OOD set disjoint from every test set. Pick another --val-ood."
                )
            self.val_ref = SplitRef(_display_name(token), ds, sp, "val-ood")
            self.val_reason = (
                s.val_ood_reason if (s and token == s.val_ood) else "given with --val-ood (not a test OOD set)"
            )
        self.device = resolve_device(cfg.device)

    # ------------------------------------------------------------------ model
    def native_format(self, model_name: str) -> InputFormat:
        info = self.info
        if info.files or info.native_size is None:
            size = self.cfg.image_size or (32 if model_name.partition(":")[0] == "smallcnn" else 224)
            return InputFormat(3, (size, size), crop_pct=0.875)
        return InputFormat(info.native_channels or 1, (info.native_size, info.native_size))

    def _model_name(self) -> str:
        return self.cfg.model or (self.suite.model if self.suite else "smallcnn")

    def _needed_splits(self) -> list[tuple[str, str]]:
        """Every ``(dataset, split)`` the run reads, in order."""
        out = [(self.cfg.id, self.train_split), (self.cfg.id, self.test_split)]
        out += [(r.dataset, r.split) for r in self.ood_refs]
        if self.val_ref is not None:
            out.append((self.val_ref.dataset, self.val_ref.split))
        return list(dict.fromkeys(out))

    def missing(self, *, load: bool) -> list[tuple[str, str]]:
        """``(what, problem)`` for every missing piece: the model weights, then each data split.
        Data sets without a cheap check are loaded only with ``load=True``."""
        name = self._model_name()
        out = []
        w = weights_problem(name, checkpoint=self.cfg.checkpoint, train=trains_model(self.cfg))
        if w:
            out.append((f"model weights ({name})", w))
        for ds, sp in self._needed_splits():
            p = check_dataset(ds, sp, data_root=self.cfg.data_root, load=load)
            if p:
                out.append((f"data {ds}:{sp}", p.removeprefix(f"{ds}:{sp}: ")))
        return out

    def preflight(self) -> None:
        """Check the weights and every data split before anything runs; raise one
        :class:`MissingResourceError` listing every missing piece."""
        if self.missing(load=False):
            raise missing_error(self.missing(load=True), ran=False)

    def build_model(self) -> LoadedModel:
        cfg = self.cfg
        name = parse_model_name(self._model_name(), check=False).canonical
        native = self.native_format(name)
        train = trains_model(cfg)
        if cfg.train_epochs is not None and cfg.checkpoint:
            raise ConfigError("--checkpoint and --train-epochs exclude each other.")
        epochs = cfg.train_epochs
        if train and epochs is None:
            epochs = (self.suite.train_epochs if self.suite else None) or 3
        if epochs is not None and epochs < 1:
            raise ConfigError(f"--train-epochs must be >= 1, got {epochs}.")
        num_classes = self.info.num_classes
        train_set = None
        if num_classes is None or train:
            train_set = get_dataset(
                cfg.id,
                self.train_split,
                data_root=cfg.data_root,
                limit=cfg.limit,
                seed=cfg.seed,
                channels=native.channels,
                image_size=native.size,
                crop_pct=native.crop_pct,
            )
            if num_classes is None:
                num_classes = len(train_set.class_names or []) or int(train_set.labels.max()) + 1
        with torch.random.fork_rng(devices=[]):  # a freshly initialised model is seeded
            torch.manual_seed(self.train_seed)
            lm = build_model(
                name,
                num_classes=int(num_classes),
                in_chans=native.channels,
                checkpoint=cfg.checkpoint,
                train=train,
                native_format=native,
                id_files=self.info.files,
                image_size=cfg.image_size,
            )
        if train:
            assert train_set is not None and epochs is not None
            fmt = lm.format
            train_set = get_dataset(
                cfg.id,
                self.train_split,
                data_root=cfg.data_root,
                limit=cfg.limit,
                seed=cfg.seed,
                **fmt.dataset_kwargs(),
            )
            if int(train_set.labels.min()) < 0:
                raise ConfigError(f"--id {cfg.id}: the training split has unlabelled images; cannot train on it.")
            recipe = {
                "arch": name,
                "num_classes": int(num_classes),
                "in_chans": fmt.channels,
                "dataset": cfg.id,
                "split": self.train_split,
                "data": train_set.fingerprint(),
                "limit": cfg.limit,
                "format": fmt.describe(),
                "init_sha256": weights_hash(lm.model),  # architecture, width and initialisation
                "epochs": int(epochs),
                "seed": self.train_seed,
                "lr": cfg.lr,
                "batch_size": cfg.train_batch_size,
                "weight_decay": 5e-4,
                "augment": True,
                "deterministic": True,
            }
            cache_root = None
            if self.cache_root:
                cache_root = os.path.join(self.cache_root, "models")
                os.makedirs(cache_root, exist_ok=True)
            lm = train_cached(
                lm, train_set, recipe, cache_root=cache_root, device=self.device, progress=cfg.progress, log=self.log
            )
        lm.model.to(self.device).eval()
        lm.weights_sha256 = weights_hash(lm.model)
        self.num_classes = int(num_classes)
        return lm

    # ------------------------------------------------------------------ data
    def load_data(self, fmt: InputFormat) -> None:
        cfg = self.cfg
        kw = fmt.dataset_kwargs()
        lim = cfg.limit
        train_full = get_dataset(cfg.id, self.train_split, data_root=cfg.data_root, **kw)
        n = len(train_full)
        s = self.suite
        fit_n = cfg.fit_size if cfg.fit_size is not None else (s.fit_size if s else None)
        fit_n = min(n, fit_n or n, lim or n)
        live_n = cfg.live_fit_size if cfg.live_fit_size is not None else (s.live_fit_size if s else None)
        live_n = min(fit_n, live_n or fit_n)
        test_n = cfg.test_size if cfg.test_size is not None else (s.test_size if s else None)
        test_lim = min(x for x in (test_n, lim) if x is not None) if (test_n or lim) else None
        perm = np.random.default_rng(cfg.seed).permutation(n)
        self.fit_rows = np.sort(perm[:fit_n])
        self.sets: dict[str, ImageSet] = {"fit": train_full.subset(self.fit_rows)}
        self.refs: dict[str, SplitRef] = {"fit": SplitRef("fit", cfg.id, self.train_split, "fit")}
        self.sets["live-fit"] = train_full.subset(np.sort(perm[:live_n]))
        self.refs["live-fit"] = SplitRef("live-fit", cfg.id, self.train_split, "fit")
        self.sets["id"] = get_dataset(
            cfg.id, self.test_split, data_root=cfg.data_root, limit=test_lim, seed=cfg.seed, **kw
        )
        self.refs["id"] = SplitRef("id", cfg.id, self.test_split, "id")
        if int((self.sets["id"].labels >= 0).sum()) == 0:
            self.log(f"note: the ID test split {cfg.id}:{self.test_split} is unlabelled; no ID accuracy")
        for r in self.ood_refs:
            self.sets[r.label] = get_dataset(
                r.dataset, r.split, data_root=cfg.data_root, limit=test_lim, seed=cfg.seed, **kw
            )
            self.refs[r.label] = r
        if self.val_ref is not None:
            vn = min(cfg.val_size, lim or cfg.val_size)
            val_rows = np.sort(perm[fit_n : fit_n + vn])
            if val_rows.size == 0:
                raise ConfigError(
                    f"--search needs validation ID images beyond the {fit_n} fit images, but the training "
                    f"split has only {n}; lower --fit-size."
                )
            self.sets["val-id"] = train_full.subset(val_rows)
            self.refs["val-id"] = SplitRef("val-id", cfg.id, self.train_split, "val-id")
            self.sets["val-ood"] = get_dataset(
                self.val_ref.dataset, self.val_ref.split, data_root=cfg.data_root, limit=vn, seed=cfg.seed, **kw
            )
            self.refs["val-ood"] = self.val_ref
        for k, ds in self.sets.items():
            if len(ds) == 0:
                raise ConfigError(f"split {k} ({self.refs[k].dataset}:{self.refs[k].split}) is empty.")

    def split_key(self, key: str) -> dict[str, Any]:
        r = self.refs[key]
        ds = self.sets[key]
        return FeatureCache.split_key(
            ds, name=r.dataset, split=r.split, data_root=self.cfg.data_root, fmt=self.lm.format.describe()
        )

    def features(self, key: str, keys: set[str]) -> Features:
        ds = self.sets[key]
        feats, st = self.fcache.features(
            adapter=self.adapter,
            dataset=ds,
            model_key=self.lm.weights_sha256,
            split_key=self.split_key(key),
            keys=set(keys),
            batch_size=self.cfg.batch_size,
            workers=self.cfg.workers,
            progress=self.cfg.progress,
            desc=f"features {self.refs[key].label}",
        )
        rec = self.split_info.setdefault(
            key,
            {
                "dataset": self.refs[key].dataset,
                "split": self.refs[key].split,
                "group": self.refs[key].group,
                "size": len(ds),
                "rows_extracted": 0,
                "model_batches": 0,
                "resumed_rows": 0,
                "seconds": 0.0,
                "keys": [],
            },
        )
        rec["rows_extracted"] += st.rows
        rec["model_batches"] += st.batches
        rec["resumed_rows"] += st.resumed_rows
        rec["seconds"] += st.seconds
        rec["keys"] = sorted(set(rec["keys"]) | set(keys))
        rec["cache"] = "extracted" if rec["rows_extracted"] else "cached"
        if st.rows:
            what = "resumed" if st.resumed_rows else "captured"
            self.log(
                f"features {self.refs[key].label}: {what} {len(keys) - st.cached_keys} key(s) for {st.rows} images in {st.seconds:.1f} s"
            )
        feats["labels"] = ds.labels.clone()
        return feats

    # ------------------------------------------------------------------ detectors
    def plan_detectors(self) -> list[DetectorRun]:
        spec = self.cfg.detectors
        if isinstance(spec, str):
            names = (
                list_detectors() if spec.strip() in ("all", "") else [s.strip() for s in spec.split(",") if s.strip()]
            )
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
                det = create(n).attach(self.lm.model, self.adapter)
                r.mode, r.why_live = self._mode(det)
                r.info = {
                    k: v
                    for k, v in type(det).info().items()
                    if k in ("paper", "needs_labels", "needs_fit", "feature_only", "needs_gradients")
                }
            except Exception as e:  # noqa: BLE001 - one broken detector must not stop the run
                r.error = _short_error(e)
                self.log(f"detector {n}: cannot be set up: {r.error}")
            runs.append(r)
        return runs

    def _mode(self, det: Detector) -> tuple[str, str]:
        if not det.feature_only:
            return "live", "feature_only=False (needs the model at score time)"
        if det.fit_mode == "multi_pass":
            return "live", "several fit passes"
        if det.fit_mode == "single_pass":
            fs = det.capture_spec(self.adapter, "fit")
            if fs is not None and fs.backward is not None:
                return "live", "gradients during fit"
        try:
            ss = det.capture_spec(self.adapter, "score")
        except Exception:  # noqa: BLE001 - the score spec may depend on fitted state
            ss = None
        if ss is not None and ss.backward is not None:
            return "live", "gradients at score time"
        return "cached", ""

    def _make(self, name: str, params: dict[str, Any]) -> Detector:
        return create(name, **params).attach(self.lm.model, self.adapter)

    def _fit_keys(self, name: str, params: dict[str, Any]) -> set[str]:
        det = self._make(name, params)
        return spec_keys(det.capture_spec(self.adapter, "fit"), self.adapter) if det.needs_fit else set()

    def _prefit_score_keys(self, name: str, params: dict[str, Any]) -> set[str]:
        try:
            return spec_keys(self._make(name, params).capture_spec(self.adapter, "score"), self.adapter)
        except Exception:  # noqa: BLE001 - known only after fitting
            return set()

    def _fit_cached(self, det: Detector, fit_feats: Features) -> Detector:
        if det.needs_fit:
            keys = spec_keys(det.capture_spec(self.adapter, "fit"), self.adapter)
            sub = fit_feats.subset([*keys, "labels"])
            dev = self.device
            chunks = _chunks(sub, len(self.sets["fit"]))
            det.fit_features((c.to(dev) for c in chunks) if dev.type != "cpu" else chunks, calibration=0.0)
        return det

    def _score_cached(self, det: Detector, feats: Features) -> np.ndarray:
        keys = spec_keys(det.capture_spec(self.adapter, "score"), self.adapter)
        missing = keys - set(feats)
        if missing:
            raise RuntimeError(f"features {sorted(missing)} were not captured")
        sub = feats.subset(keys)
        n = next(iter(feats.values())).shape[0]
        dev = self.device
        outs = [
            det.score_features(c.to(dev) if dev.type != "cpu" else c).detach().float().cpu() for c in _chunks(sub, n)
        ]
        return torch.cat(outs).numpy().astype(np.float64) if outs else np.zeros(0)

    # live detectors ----------------------------------------------------
    def _loader(self, key: str) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.sets[key], batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.workers
        )

    def _scores_path(self, name: str, params: dict[str, Any], key: str) -> str | None:
        if self.cache_root is None:
            return None
        det_key = {"detector": name, "params": params, "version": __version__}
        fit = self.split_key("live-fit") if detector_class(name).needs_fit else None
        h = hashlib.sha256(
            json.dumps({"det": det_key, "fit": fit, "split": self.split_key(key)}, sort_keys=True, default=str).encode()
        ).hexdigest()[:24]
        d = os.path.join(self.cache_root, "scores", self.lm.weights_sha256[:24])
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f"{name}-{h}.pt")

    def _live_scores(
        self, name: str, params: dict[str, Any], keys: list[str], state: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """Scores of a live detector on ``keys`` splits (cached per split; fits only if needed)."""
        out: dict[str, np.ndarray] = {}
        todo = []
        for k in keys:
            p = self._scores_path(name, params, k)
            if p and os.path.isfile(p):
                out[k] = torch.load(p, map_location="cpu", weights_only=True)["scores"].numpy().astype(np.float64)
                state["cached_splits"] = [*state.get("cached_splits", []), k]
            else:
                todo.append(k)
        if not todo:
            return out
        det = state.get("det")
        if det is None:
            det = self._make(name, params)
            if det.needs_fit:
                t0 = time.perf_counter()
                # library default calibration (0.1): some multi-pass detectors need held-out ID;
                # the bench scores and never thresholds, so the held-out size is not warned about
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "the predict threshold was calibrated", CalibrationWarning)
                    det.fit(self.lm.model, self._loader("live-fit"), adapter=self.adapter, progress=self.cfg.progress)
                state["fit_seconds"] = state.get("fit_seconds", 0.0) + time.perf_counter() - t0
            state["det"] = det
        for k in todo:
            t0 = time.perf_counter()
            parts = []
            bar = progress_bar(
                total=len(self.sets[k]), desc=f"{name} {self.refs[k].label}", enabled=self.cfg.progress, unit="img"
            )
            try:
                for x, _ in self._loader(k):
                    parts.append(det.score(x).detach().float().cpu())
                    bar.update(x.shape[0])
            finally:
                bar.close()
            s = torch.cat(parts)
            p = self._scores_path(name, params, k)
            if p:
                atomic_write(p, lambda f, s=s: torch.save({"scores": s}, f))
            out[k] = s.numpy().astype(np.float64)
            state["score_seconds"] = state.get("score_seconds", 0.0) + time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ search
    def _search_configs(self, r: DetectorRun) -> list[dict[str, Any]]:
        if not self.cfg.search:
            return [{}]
        return _grid(dict(detector_class(r.name).search_space))

    @staticmethod
    def _val_auroc(s_id: np.ndarray, s_ood: np.ndarray) -> float:
        if not (np.isfinite(s_id).all() and np.isfinite(s_ood).all()):
            return float("nan")
        return float(evaluate(s_id, s_ood)["auroc"])

    # ------------------------------------------------------------------ main
    def run(self) -> BenchResult:
        cfg = self.cfg
        t_all, c_all = time.perf_counter(), time.process_time()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.resolve()
        self.preflight()
        try:
            with self._stage("model"):
                self.lm = self.build_model()
            self.log(
                f"model: {self.lm.name} ({self.lm.weights}, sha256 {self.lm.weights_sha256[:12]}), input "
                f"{self.lm.format.channels}x{self.lm.format.size[0]}x{self.lm.format.size[1]} on {self.device}"
            )
            with self._stage("data"):
                self.load_data(self.lm.format)
        except MissingResourceError as e:  # a set without a cheap check: report every missing piece
            raise missing_error(self.missing(load=True) or [("", str(e))], ran=True) from None
        self.adapter: Adapter = get_adapter(self.lm.model)
        x0 = self.sets["id"][0][0][None].to(self.device)
        self.adapter.ensure_resolved(x0)
        runs = self.plan_detectors()
        cached = [r for r in runs if r.error is None and r.mode == "cached"]
        live = [r for r in runs if r.error is None and r.mode == "live"]
        configs = {r.name: self._search_configs(r) for r in runs if r.error is None}

        # ---- fit split: one pass for every cached detector and configuration
        fit_keys: set[str] = set()
        for r in cached:
            try:
                for c in configs[r.name]:
                    fit_keys |= self._fit_keys(r.name, c)
            except Exception as e:  # noqa: BLE001
                r.error = _short_error(e)
        cached = [r for r in cached if r.error is None]
        with self._stage("features_fit"):
            fit_feats = self.features("fit", fit_keys) if fit_keys else Features(labels=self.sets["fit"].labels.clone())

        # ---- validation splits (search): pre-fit score keys of every configuration
        val_feats: dict[str, Features] = {}
        searching = self.val_ref is not None and any(len(configs[r.name]) > 1 for r in cached + live)
        if searching:
            keys: set[str] = set()
            for r in cached:
                if len(configs[r.name]) > 1:
                    for c in configs[r.name]:
                        keys |= self._prefit_score_keys(r.name, c)
            with self._stage("features_val"):
                for k in ("val-id", "val-ood"):
                    val_feats[k] = self.features(k, keys | {"logits"})

        # ---- cached detectors: search, fit
        t_det, c_det = time.perf_counter(), time.process_time()
        bar = progress_bar(total=len(cached), desc="fit detectors", enabled=cfg.progress, unit="det")
        for r in cached:
            t0 = time.perf_counter()
            try:
                cands = configs[r.name]
                best: tuple[float, int, Detector | None] = (-math.inf, -1, None)
                for i, c in enumerate(cands):
                    det = self._fit_cached(self._make(r.name, c), fit_feats)
                    if len(cands) == 1:
                        best = (math.nan, 0, det)
                        break
                    need = spec_keys(det.capture_spec(self.adapter, "score"), self.adapter)
                    for k in ("val-id", "val-ood"):
                        if need - set(val_feats[k]):
                            val_feats[k] = self.features(k, set(val_feats[k]) - {"labels"} | need)
                    auc = self._val_auroc(
                        self._score_cached(det, val_feats["val-id"]), self._score_cached(det, val_feats["val-ood"])
                    )
                    r.search.append({"params": c, "val_auroc": auc})
                    if auc > best[0]:
                        best = (auc, i, det)
                if best[2] is None:
                    raise RuntimeError("no configuration could be scored on the validation sets (non-finite scores)")
                r.det = best[2]
                r.params = r.det.get_params()
            except Exception as e:  # noqa: BLE001
                r.error = _short_error(e)
                self.log(f"detector {r.name}: fit failed: {r.error}")
                if os.environ.get("NORMSCORE_BENCH_DEBUG"):
                    traceback.print_exc()
            r.seconds["fit"] = time.perf_counter() - t0
            bar.update(1)
        bar.close()
        self._add("detectors_fit", t_det, c_det)

        # ---- test splits: one pass each, union of the chosen detectors' score keys (+ logits)
        test_keys: set[str] = {"logits"}
        for r in cached:
            if r.error is None and r.det is not None:
                try:
                    test_keys |= spec_keys(r.det.capture_spec(self.adapter, "score"), self.adapter)
                except Exception as e:  # noqa: BLE001
                    r.error = _short_error(e)
        test_splits = ["id", *[x.label for x in self.ood_refs]]
        test_feats: dict[str, Features] = {}
        any_cached = any(r.error is None for r in cached)
        with self._stage("features_test"):
            for k in test_splits if any_cached else ["id"]:  # ID logits give the accuracy
                test_feats[k] = self.features(k, test_keys)
        t_det, c_det = time.perf_counter(), time.process_time()
        bar = progress_bar(total=len(cached), desc="score detectors", enabled=cfg.progress, unit="det")
        for r in cached:
            if r.error is None:
                t0 = time.perf_counter()
                try:
                    assert r.det is not None
                    for k in test_splits:
                        r.scores[k] = self._score_cached(r.det, test_feats[k])
                except Exception as e:  # noqa: BLE001
                    r.error = _short_error(e)
                    self.log(f"detector {r.name}: scoring failed: {r.error}")
                r.seconds["score"] = time.perf_counter() - t0
            bar.update(1)
        bar.close()
        self._add("detectors_score", t_det, c_det)

        # ---- live detectors
        for r in live:
            t_det, c_det = time.perf_counter(), time.process_time()
            try:
                cands = configs[r.name] if self.val_ref is not None else [{}]
                best_c, best_auc = cands[0], -math.inf
                t0 = time.perf_counter()
                if len(cands) > 1:
                    sbar = progress_bar(total=len(cands), desc=f"search {r.name}", enabled=cfg.progress, unit="cfg")
                    for c in cands:
                        v = self._live_scores(r.name, c, ["val-id", "val-ood"], {})
                        auc = self._val_auroc(v["val-id"], v["val-ood"])
                        r.search.append({"params": c, "val_auroc": auc})
                        if auc > best_auc:
                            best_c, best_auc = c, auc
                        sbar.update(1)
                    sbar.close()
                r.seconds["search"] = time.perf_counter() - t0
                state: dict[str, Any] = {}
                t0 = time.perf_counter()
                r.scores = self._live_scores(r.name, best_c, test_splits, state)
                r.seconds["fit"] = state.get("fit_seconds", 0.0)
                r.seconds["score"] = state.get("score_seconds", 0.0)
                r.info["live_scores_from_cache"] = state.get("cached_splits", [])
                r.params = (state.get("det") or self._make(r.name, best_c)).get_params()
            except Exception as e:  # noqa: BLE001
                r.error = _short_error(e)
                self.log(f"detector {r.name} (live): failed: {r.error}")
                if os.environ.get("NORMSCORE_BENCH_DEBUG"):
                    traceback.print_exc()
            self._add(f"live:{r.name}", t_det, c_det)

        # ---- metrics
        id_logits = test_feats["id"]["logits"]
        id_labels = self.sets["id"].labels
        lab = id_labels >= 0
        self.id_accuracy = (
            float((id_logits.argmax(1)[lab] == id_labels[lab]).double().mean()) if bool(lab.any()) else float("nan")
        )
        groups = {g: [x.label for x in self.ood_refs if x.group == g] for g in ("near", "far")}
        for r in runs:
            if r.error is not None:
                continue
            s_id = r.scores["id"]
            for x in self.ood_refs:
                try:
                    r.metrics[x.label] = evaluate(s_id, r.scores[x.label])
                except Exception as e:  # noqa: BLE001 - e.g. NaN scores
                    r.metrics[x.label] = {"error": _short_error(e)}
            for g, labels in groups.items():
                vals = [r.metrics[lb] for lb in labels if "auroc" in r.metrics.get(lb, {})]
                if labels and len(vals) == len(labels):
                    r.metrics[g] = {m: float(np.mean([v[m] for v in vals])) for m in METRICS}
        self.timings["total"] = time.perf_counter() - t_all
        self.cpu["total"] = time.process_time() - c_all
        return self._result(runs, started)

    # ------------------------------------------------------------------ the JSON document
    def _result(self, runs: list[DetectorRun], started: str) -> BenchResult:
        cfg = self.cfg
        dets = {}
        for r in runs:
            dets[r.name] = {
                "mode": r.mode,
                "why_live": r.why_live or None,
                "params": r.params,
                "search": r.search or None,
                "metrics": r.metrics,
                "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
                "error": r.error,
                **r.info,
            }
        splits = {}
        for k, ds in self.sets.items():
            ref = self.refs[k]
            rec = dict(self.split_info.get(k, {}))
            rec.update(
                {"label": ref.label, "dataset": ref.dataset, "split": ref.split, "group": ref.group, "size": len(ds)}
            )
            rec.setdefault("cache", "not captured")
            for z in ("rows_extracted", "model_batches", "resumed_rows"):
                rec.setdefault(z, 0)
            if "seconds" in rec:
                rec["seconds"] = round(rec["seconds"], 3)
            splits[k] = rec
        results = {
            "normscore_bench": 1,
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": cfg.command,
            "config": asdict(cfg),
            "versions": _versions(),
            "machine": _machine(self.device),
            "model": self.lm.describe(),
            "id": {
                "dataset": cfg.id,
                "train_split": self.train_split,
                "test_split": self.test_split,
                "num_classes": self.num_classes,
                "fit_size": len(self.sets["fit"]),
                "live_fit_size": len(self.sets["live-fit"]),
                "test_size": len(self.sets["id"]),
                "accuracy": self.id_accuracy,
            },
            "ood": [
                {
                    "label": r.label,
                    "dataset": r.dataset,
                    "split": r.split,
                    "group": r.group,
                    "size": len(self.sets[r.label]),
                }
                for r in self.ood_refs
            ],
            "validation": (
                {
                    "id": f"{len(self.sets['val-id'])} held-out {cfg.id}:{self.train_split} images (disjoint from the fit images)",
                    "ood": {
                        "dataset": self.val_ref.dataset,
                        "split": self.val_ref.split,
                        "size": len(self.sets["val-ood"]),
                    },
                    "why": self.val_reason,
                    "criterion": "highest validation AUROC (ties: first in grid order)",
                }
                if self.val_ref is not None
                else None
            ),
            "seed": cfg.seed,
            "train_seed": self.train_seed,
            "registered_detectors": list_detectors(),
            "detectors": dets,
            "splits": splits,
            "cache_dir": self.cache_root,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "cpu_seconds": {k: round(v, 3) for k, v in self.cpu.items()},
            "metric_notes": dict(METRICS),
        }
        scores = {r.name: r.scores for r in runs if r.error is None}
        return BenchResult(_json_safe(results), scores, None)


def trains_model(cfg: BenchConfig) -> bool:
    """Whether the run trains its model here (``--train-epochs``, or ``smallcnn`` without a
    checkpoint) rather than loading pretrained or checkpoint weights."""
    suite = SUITES.get(cfg.id)
    kind = parse_model_name(cfg.model or (suite.model if suite else "smallcnn"), check=False).kind
    return cfg.train_epochs is not None or (kind == "smallcnn" and not cfg.checkpoint)


def run_benchmark(cfg: BenchConfig) -> BenchResult:
    """Run a benchmark (see the module docstring) and write its outputs to ``cfg.out``."""
    res = _Run(cfg).run()
    if cfg.out is not None:
        t0 = time.perf_counter()
        write_outputs(res, cfg.out, plots=cfg.plots, progress=cfg.progress)
        res.results["timings"]["outputs"] = round(time.perf_counter() - t0, 3)
        res.out_dir = cfg.out
        write_json(res, cfg.out)
    return res
