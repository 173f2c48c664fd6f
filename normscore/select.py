"""Selection without OOD data: rank detectors and their hyperparameters on pseudo-OOD made from
ID images only (issue 15, item 3).

>>> sel = normscore.select(model, id_loader, candidates=["knn", "mahalanobis", "energy"])
>>> sel.ranking[0]         # the best configuration: name, params, AUROC / fpr95 per kind and mean
>>> print(sel.table())     # the evidence, one row per configuration, best first
>>> sel.best_.score(x)     # the winner, fitted (on all ID data by default)

Procedure (deterministic for a given loader order and ``seed``):

1. **Split.** Sample ``i`` of the ID loader (its position in loader order, or the ``"index"`` a
   dict batch carries, as in :class:`~normscore.stream.FitStream`) is *held out* when
   ``u(i) < holdout`` with ``u(i) = splitmix64(i, salt=seed) / 2**64`` (a hash of the position:
   independent of the batch size, and unlike a stride it cannot alias with a periodic loader
   order such as classes interleaved). The other samples are the *fit part*.
2. **Pseudo-OOD.** Every held-out image is turned into one pseudo-OOD image per kind
   (:data:`PSEUDO_OOD`) by :func:`pseudo_ood`, a function of that ID image (its position, and
   for ``"mix"`` the previous held-out image) and ``seed``, nothing else. The transforms work on
   the batch as the model receives it (after the loader's preprocessing), like the jigsaw of
   FeatureNorm.
3. **Fit and score.** Every candidate configuration (a detector name with one point of its
   ``search_space`` grid) is fitted on the fit part and scored on the held-out ID images and
   on each pseudo-OOD set. Feature-only detectors (the default candidates) share **one** model
   pass over the loader: the fit part's features (the union of every configuration's fit
   features) and the held-out images with their pseudo-OOD copies (one forward pass per
   batch, the union of the score features) are captured together, then every configuration is
   fitted with :meth:`~normscore.DetectorSet.fit_features` (all configurations of one detector
   in one :class:`~normscore.DetectorSet`) and scored on the stored features; a configuration
   whose score features are only known after fitting costs one more pass over the held-out
   images. Detectors that need the model (gradients, several fit passes) are fitted together
   in one :class:`~normscore.DetectorSet` on the fit part (their own passes; 10% of it held out
   for their threshold, as the bench does) and scored with the model on the held-out images.
   Every configuration is fitted afresh: hyperparameters are not switched with ``set_params``
   on a shared fit, because no detector declares which of its hyperparameters are score-time
   only, and a fit-time one switched after the fit would silently score with the wrong state;
   a fit on stored features costs no model pass.
4. **Rank.** AUROC of held-out ID (positive) vs each pseudo-OOD set, and fpr95 (ID positive,
   :func:`normscore.metrics.evaluate`); configurations are ranked by the mean AUROC over the
   kinds, ties by the lower mean fpr95, then by candidate order (the order given, each
   detector's grid in order). A configuration that fails, or scores NaN/Inf, ranks last with
   its error.
5. **best_.** With ``refit=True`` (default) the winner is fitted again on **all** ID data with
   :meth:`Detector.fit` (one more fit; its threshold is calibrated as ``fit`` does, on 10% held
   out). With ``refit=False`` it is the detector fitted on the fit part, its ``predict``
   threshold calibrated on the held-out ID scores (no extra pass).

Never touches OOD or test data: the function receives one ID loader and reads nothing else.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import Adapter
from .detectors.base import Detector
from .detectors.decision import Decision
from .detectors.dset import DetectorSet
from .detectors.registry import create, detector_class, list_detectors
from .errors import CalibrationWarning, ConfigError, InputError, InputTypeError
from .metrics import evaluate
from .progress import progress_bar
from .pseudo_ood import DEFAULT_KINDS, PSEUDO_OOD, heldout_mask, pseudo_ood
from .stream import FitStream, read_labels, split_batch
from .taps import CaptureSpec, Features, capture, spec_keys

__all__ = [
    "DEFAULT_KINDS",
    "PSEUDO_OOD",
    "Candidate",
    "Selection",
    "grid",
    "heldout_mask",
    "pseudo_ood",
    "select",
]

_FEATURE_CHUNK = 4096

# ---------------------------------------------------------------------------------------------
# candidates


def grid(space: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of ``space``'s values, in order (``[{}]`` for an empty space)."""
    if not space:
        return [{}]
    keys = list(space)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(space[k] for k in keys))]


def _needs_model(det: Detector, adapter: Adapter) -> bool:
    """Whether ``det`` needs the model beyond one shared forward pass (the bench's "live")."""
    if not det.feature_only or det.fit_mode == "multi_pass":
        return True
    if det.fit_mode == "single_pass":
        fs = det.capture_spec(adapter, "fit")
        if fs is not None and fs.backward is not None:
            return True
    try:
        ss = det.capture_spec(adapter, "score")
    except Exception:  # noqa: BLE001 - the score spec may depend on fitted state
        ss = None
    return ss is not None and ss.backward is not None


def _default_names() -> list[str]:
    """Every registered feature-only detector that fits in one forward pass (the default
    candidates): ``feature_only`` and not ``multi_pass`` (``fusion`` combines other detectors
    over several passes and is left out)."""
    return [
        n for n in list_detectors() if detector_class(n).feature_only and detector_class(n).fit_mode != "multi_pass"
    ]


def _configs(candidates: Sequence[str | tuple[str, dict[str, Any]]] | None, search: bool) -> list[tuple[str, dict]]:
    if candidates is None:
        candidates = _default_names()
    if isinstance(candidates, str):
        candidates = [candidates]
    out: list[tuple[str, dict[str, Any]]] = []
    for c in candidates:
        if isinstance(c, str):
            cls = detector_class(c)
            out += [(c, p) for p in (grid(dict(cls.search_space)) if search else [{}])]
        elif isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], dict):
            detector_class(c[0])
            out.append((c[0], dict(c[1])))
        else:
            raise ConfigError(
                f"a candidate is a detector name or a (name, params) pair, got {c!r}; e.g. "
                "candidates=['knn', ('energy', {'temperature': 2.0})]."
            )
    seen = set()
    for n, p in out:
        key = (n, repr(sorted(p.items())))
        if key in seen:
            raise ConfigError(f"candidate {n} {p} is given twice.")
        seen.add(key)
    if not out:
        raise ConfigError("select needs at least one candidate detector.")
    return out


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class Candidate:
    """One candidate configuration and its evidence (AUROC / fpr95 per pseudo-OOD kind, in [0, 1])."""

    name: str
    params: dict[str, Any]
    auroc: dict[str, float] = field(default_factory=dict)
    fpr95: dict[str, float] = field(default_factory=dict)
    mean_auroc: float = float("nan")
    mean_fpr95: float = float("nan")
    order: int = 0  # position among the candidates (the last tie-break)
    rank: int = 0  # 1 = best
    error: str | None = None
    mode: str = "features"  # "features" (one shared pass) or "model" (own passes)

    def key(self) -> tuple:
        ok = self.error is None and math.isfinite(self.mean_auroc)
        fpr = self.mean_fpr95 if math.isfinite(self.mean_fpr95) else math.inf
        return (0 if ok else 1, -self.mean_auroc if ok else 0.0, fpr if ok else 0.0, self.order)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "name": self.name,
            "params": self.params,
            "mean_auroc": self.mean_auroc,
            "mean_fpr95": self.mean_fpr95,
            "auroc": dict(self.auroc),
            "fpr95": dict(self.fpr95),
            "mode": self.mode,
            "error": self.error,
        }


@dataclass
class Selection:
    """What :func:`select` found: every configuration ranked (best first) with its evidence.

    ``ranking``: :class:`Candidate` list, best first; ``best``: the first; ``best_``: the
    winner fitted (see ``refit`` of :func:`select`; ``None`` with ``refit=None``); ``kinds``:
    the pseudo-OOD kinds; ``n_fit`` / ``n_heldout``: the sizes of the fit part and of the
    held-out ID images (each pseudo-OOD set has ``n_heldout`` images too).
    """

    ranking: list[Candidate]
    kinds: tuple[str, ...]
    holdout: float
    seed: int
    n_fit: int
    n_heldout: int
    best_: Detector | None = None
    refit: bool | None = True
    criterion: str = (
        "highest mean AUROC over the pseudo-OOD kinds (held-out ID vs pseudo-OOD); ties: lower mean fpr95, "
        "then candidate order"
    )

    @property
    def best(self) -> Candidate:
        return self.ranking[0]

    def for_detector(self, name: str) -> list[Candidate]:
        """The configurations of detector ``name``, best first."""
        return [c for c in self.ranking if c.name == name]

    def best_params(self, name: str) -> dict[str, Any]:
        """The hyperparameters chosen for detector ``name`` (its best configuration)."""
        rows = self.for_detector(name)
        if not rows:
            raise ConfigError(f"{name!r} was not a candidate; candidates: {sorted({c.name for c in self.ranking})}.")
        return dict(rows[0].params)

    def detectors(self) -> list[Candidate]:
        """One row per detector (its best configuration), best first: the ranking of detectors."""
        seen: set[str] = set()
        out = []
        for c in self.ranking:
            if c.name not in seen:
                seen.add(c.name)
                out.append(c)
        return out

    @property
    def evidence(self) -> dict[str, Any]:
        """The evidence as a JSON-able dict: the procedure's settings and every row."""
        return {
            "kinds": {k: PSEUDO_OOD[k] for k in self.kinds},
            "holdout": self.holdout,
            "seed": self.seed,
            "n_fit": self.n_fit,
            "n_heldout": self.n_heldout,
            "criterion": self.criterion,
            "best_fitted_on": {True: "all ID data", False: "the fit part", None: "not fitted"}[self.refit],
            "rows": [c.to_dict() for c in self.ranking],
        }

    def table(self, top: int | None = None) -> str:
        """The ranking as a text table: AUROC / fpr95 (%) per kind and mean."""
        head = ["rank", "detector", "params", *[f"{k} AUROC" for k in self.kinds], "mean AUROC", "mean fpr95"]
        rows = []
        for c in self.ranking[:top]:
            params = ", ".join(f"{k}={v}" for k, v in c.params.items()) or "-"
            if c.error is not None:
                rows.append([str(c.rank), c.name, params, *["err"] * len(self.kinds), "err", c.error[:60]])
                continue
            rows.append(
                [
                    str(c.rank),
                    c.name,
                    params,
                    *[f"{100 * c.auroc.get(k, float('nan')):.2f}" for k in self.kinds],
                    f"{100 * c.mean_auroc:.2f}",
                    f"{100 * c.mean_fpr95:.2f}",
                ]
            )
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
        return "\n".join(fmt.format(*r) for r in [head, *rows])

    def __repr__(self) -> str:
        b = self.best
        return (
            f"Selection({len(self.ranking)} configurations, kinds {list(self.kinds)}; best {b.name} {b.params} "
            f"mean AUROC {b.mean_auroc:.4f})"
        )


# ---------------------------------------------------------------------------------------------
# the passes


class _Views:
    """Held-out batches with their pseudo-OOD copies, in one tensor per batch."""

    def __init__(self, kinds: tuple[str, ...], seed: int) -> None:
        self.kinds, self.seed = kinds, seed
        self.carry: torch.Tensor | None = None  # the previous held-out image (for "mix")

    def reset(self) -> None:
        self.carry = None

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        first = torch.rot90(x[:1], 2, dims=(2, 3)) if self.carry is None else self.carry.to(x.device)
        partner = torch.cat([first, x[:-1]])
        self.carry = x[-1:].clone()
        views = [pseudo_ood(k, x, index, seed=self.seed, partner=partner) for k in self.kinds]
        return torch.cat([x, *[v.to(x.dtype) for v in views]])


class _FitPart:
    """A re-iterable loader over the fit part of ``loader`` (dict batches with ``"index"``)."""

    def __init__(self, loader: Iterable, holdout: float, seed: int, max_samples: int | None) -> None:
        self.loader, self.holdout, self.seed, self.max_samples = loader, holdout, seed, max_samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pos = 0
        for batch in self.loader:
            x, y_raw, idx = split_batch(batch)
            n = x.shape[0]
            y, _ = read_labels(y_raw, n)
            if idx is None:
                idx = torch.arange(pos, pos + n)
            if self.max_samples is not None and pos + n > self.max_samples:
                keep = self.max_samples - pos
                x, idx, y = x[:keep], idx[:keep], (y[:keep] if y is not None else None)
            pos += x.shape[0]
            fit = ~heldout_mask(idx, self.holdout, self.seed)
            if bool(fit.any()):
                out = {"image": x[fit.to(x.device)], "index": idx[fit]}
                if y is not None:
                    out["label"] = y[fit.to(y.device)]
                yield out
            if self.max_samples is not None and pos >= self.max_samples:
                break


def _chunks(feats: Features, size: int = _FEATURE_CHUNK) -> list[Features]:
    n = feats.batch_size
    return [feats.select(slice(i, i + size)) for i in range(0, n, size)]


def _score_stored(det: Detector, feats: Features, keys: set[str], device: torch.device) -> torch.Tensor:
    sub = feats.subset(keys)
    parts = [det.score_features(c.to(device)).detach().double().cpu() for c in _chunks(sub)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def _metrics(s_id: torch.Tensor, s_ood: dict[str, torch.Tensor], c: Candidate) -> None:
    a = s_id.numpy()
    for k, s in s_ood.items():
        b = s.numpy()
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise FloatingPointError("non-finite scores (NaN/Inf) on the held-out ID or pseudo-OOD images")
        m = evaluate(a, b)
        c.auroc[k], c.fpr95[k] = float(m["auroc"]), float(m["fpr95"])
    c.mean_auroc = float(np.mean([c.auroc[k] for k in s_ood]))
    c.mean_fpr95 = float(np.mean([c.fpr95[k] for k in s_ood]))


def select(
    model: nn.Module,
    id_loader: Iterable,
    candidates: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    pseudo_ood: Sequence[str] = DEFAULT_KINDS,
    *,
    search: bool = True,
    holdout: float = 0.2,
    seed: int = 0,
    refit: bool | None = True,
    adapter: Adapter | None = None,
    tpr: float = 0.95,
    max_samples: int | None = None,
    progress: bool | None = None,
) -> Selection:
    """Rank candidate detectors (and their hyperparameters) with pseudo-OOD made from ID data.

    ``candidates``: detector names (each with every point of its ``search_space`` grid when
    ``search``, else its defaults) and/or ``(name, params)`` pairs (one configuration each);
    default: every registered feature-only detector that fits in one forward pass.
    ``pseudo_ood``: kinds from :data:`PSEUDO_OOD` (default :data:`DEFAULT_KINDS`). ``holdout``:
    share of the ID samples held out (the rest fits the detectors). ``seed``: the split and
    the pseudo-OOD draws. ``refit``: ``True`` fits the winner on all ID data (``best_``), ``False``
    keeps the one fitted on the fit part (threshold calibrated on the held-out ID scores), ``None``
    returns no fitted detector. ``id_loader`` must be re-iterable (a ``DataLoader`` or a list)
    when a candidate needs more than one pass. The procedure is in the module docstring
    (:mod:`normscore.select`) and in docs/seed-methods.md.
    """
    kinds = tuple(pseudo_ood) if not isinstance(pseudo_ood, str) else (pseudo_ood,)
    if not kinds:
        raise ConfigError(f"pseudo_ood needs at least one kind of {list(PSEUDO_OOD)}.")
    for k in kinds:
        if k not in PSEUDO_OOD:
            raise ConfigError(f"unknown pseudo-OOD kind {k!r}; the kinds are {list(PSEUDO_OOD)}.")
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"a pseudo-OOD kind is given twice: {list(kinds)}.")
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout must be in (0, 1), got {holdout}.")
    if not 0.0 < tpr <= 1.0:
        raise ConfigError(f"tpr must be in (0, 1], got {tpr}.")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"select needs a torch.nn.Module model, got {type(model).__name__}.")
    adapter = Detector._resolve_adapter(model, adapter)
    configs = _configs(candidates, search)
    if isinstance(id_loader, torch.Tensor):
        raise InputTypeError("select() takes a loader of ID batches, not one tensor. Wrap it: [x] or a DataLoader.")
    if isinstance(id_loader, Iterator):
        raise InputTypeError(
            "select() reads the ID loader more than once (the selection pass, and the refit or the passes of "
            "detectors that need the model); pass a re-iterable loader (a DataLoader or a list), not a generator."
        )

    cands = [Candidate(n, p, order=i) for i, (n, p) in enumerate(configs)]
    dets: list[Detector | None] = []
    for c in cands:
        try:
            dets.append(create(c.name, **c.params).attach(model, adapter))
        except Exception as e:  # noqa: BLE001 - one bad configuration must not stop the others
            c.error = _short(e)
            dets.append(None)

    stream = FitStream(adapter, id_loader, calibration=0.0, max_samples=max_samples, progress=progress, desc="select")
    stream.need_labels = sorted({d.name for d in dets if d is not None and d.fit_needs_labels()})
    views = _Views(kinds, seed)

    # which configurations share the stored-feature route (the first pass resolves the adapter)
    first = True
    fit_spec: CaptureSpec | None = None
    score_spec = CaptureSpec(logits=True)
    fit_parts: list[Features] = []
    held_parts: dict[str, list[Features]] = {"id": [], **{k: [] for k in kinds}}
    n_fit = n_held = 0
    model_route: list[int] = []
    feat_route: list[int] = []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def plan() -> None:
        nonlocal fit_spec, score_spec
        for i, (c, d) in enumerate(zip(cands, dets)):
            if d is None:
                continue
            try:
                if _needs_model(d, adapter):
                    c.mode = "model"
                    model_route.append(i)
                    continue
                if d.needs_fit:
                    fs = d.capture_spec(adapter, "fit")
                    if fs is not None:
                        fit_spec = fs if fit_spec is None else fit_spec | fs
                try:
                    score_spec = score_spec | d.capture_spec(adapter, "score")
                except Exception:  # noqa: BLE001 - known after the fit (one more pass then)
                    pass
                feat_route.append(i)
            except Exception as e:  # noqa: BLE001
                c.error = _short(e)

    def held_pass(spec: CaptureSpec, store: dict[str, list[Features]]) -> int:
        views.reset()
        n = 0
        for b in stream.batches():
            h = heldout_mask(b.index, holdout, seed)
            if not bool(h.any()):
                continue
            hd = h.to(b.x.device)
            xh, ih = b.x[hd], b.index[h]
            _store_views(capture(adapter, views(xh, ih), spec, validated=True, index=ih.repeat(1 + len(kinds))), store)
            n += int(h.sum())
        return n

    def _store_views(feats: Features, store: dict[str, list[Features]]) -> None:
        b = feats.batch_size // (1 + len(kinds))
        for j, k in enumerate(["id", *kinds]):
            store[k].append(feats.select(slice(j * b, (j + 1) * b)).to("cpu"))

    # ---- pass 1: the fit part's features and the held-out images with their pseudo-OOD copies
    if all(d is None for d in dets):
        raise ConfigError("no candidate could be created: " + "; ".join(f"{c.name}: {c.error}" for c in cands))
    for b in stream.batches():
        if first:
            plan()
            first = False
            if not feat_route:
                break  # only model-route candidates: their own passes below
        h = heldout_mask(b.index, holdout, seed)
        f = ~h
        if bool(f.any()) and fit_spec is not None:
            fd = f.to(b.x.device)
            feats = capture(adapter, b.x[fd], fit_spec, validated=True, index=b.index[f])
            if b.y is not None:
                feats["labels"] = b.y[fd]
            fit_parts.append(feats.to("cpu"))
        n_fit += int(f.sum())
        if bool(h.any()):
            hd = h.to(b.x.device)
            xh, ih = b.x[hd], b.index[h]
            _store_views(
                capture(adapter, views(xh, ih), score_spec, validated=True, index=ih.repeat(1 + len(kinds))), held_parts
            )
            n_held += int(h.sum())
    if feat_route and n_held == 0:
        raise InputError(
            f"no ID sample was held out (holdout={holdout} of {n_fit} samples); pass more ID data or a larger holdout."
        )
    if feat_route and n_fit == 0:
        raise InputError("every ID sample was held out; pass more ID data or a smaller holdout.")
    fit_feats = Features.cat(fit_parts) if fit_parts else Features()
    held = {k: Features.cat(v) for k, v in held_parts.items()}
    del fit_parts, held_parts

    # the fitted detector of the best configuration so far and its held-out ID scores (refit=False)
    keep: dict[str, Any] = {}

    def consider(i: int, det: Detector, s_id: torch.Tensor) -> None:
        if refit is False and cands[i].error is None:
            k = cands[i].key()
            if not keep or k < keep["key"]:
                keep.update(key=k, det=det, s_id=s_id)

    # ---- the stored-feature route: one DetectorSet per detector name, fitted on stored features
    by_name: dict[str, list[int]] = {}
    for i in feat_route:
        by_name.setdefault(cands[i].name, []).append(i)
    deferred: list[tuple[int, Detector]] = []
    bar = progress_bar(total=len(feat_route), desc="select: fit/score", enabled=progress, unit="cfg")
    for idxs in by_name.values():
        fitted: list[tuple[int, Detector]] = []
        ds_dets = [dets[i] for i in idxs]
        try:
            ds = DetectorSet(ds_dets).attach(model, adapter)
            if any(d.needs_fit for d in ds_dets):
                if fit_feats.batch_size == 0:
                    raise InputError("no fit features were captured")
                keys = set(fit_feats) - {"labels"}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CalibrationWarning)
                    ds.fit_features(
                        [c.to(device) for c in _chunks(fit_feats.subset([*keys, "labels"]))], calibration=0.0
                    )
            fitted = list(zip(idxs, ds_dets))
        except Exception:  # noqa: BLE001 - fit the configurations one by one to find the bad ones
            for i in idxs:
                try:
                    d = dets[i]
                    if d.needs_fit:
                        keys = set(spec_keys(adapter, d.capture_spec(adapter, "fit")))
                        d.fit_features(
                            [c.to(device) for c in _chunks(fit_feats.subset([*keys, "labels"]))], calibration=0.0
                        )
                    fitted.append((i, d))
                except Exception as e:  # noqa: BLE001
                    cands[i].error = _short(e)
                    bar.update(1)
        for i, d in fitted:
            try:
                keys = set(spec_keys(adapter, d.capture_spec(adapter, "score")))
                if keys - set(held["id"]):
                    deferred.append((i, d))
                    continue
                s_id = _score_stored(d, held["id"], keys, device)
                _metrics(s_id, {k: _score_stored(d, held[k], keys, device) for k in kinds}, cands[i])
                consider(i, d, s_id)
            except Exception as e:  # noqa: BLE001
                cands[i].error = _short(e)
            bar.update(1)
    if deferred:  # score features known only after the fit: one more pass over the held-out images
        spec = CaptureSpec(logits=True)
        for _, d in deferred:
            spec = spec | d.capture_spec(adapter, "score")
        store: dict[str, list[Features]] = {"id": [], **{k: [] for k in kinds}}
        held_pass(spec, store)
        held2 = {k: Features.cat(v) for k, v in store.items()}
        for i, d in deferred:
            try:
                keys = set(spec_keys(adapter, d.capture_spec(adapter, "score")))
                s_id = _score_stored(d, held2["id"], keys, device)
                _metrics(s_id, {k: _score_stored(d, held2[k], keys, device) for k in kinds}, cands[i])
                consider(i, d, s_id)
            except Exception as e:  # noqa: BLE001
                cands[i].error = _short(e)
            bar.update(1)
    bar.close()
    del fit_feats, held

    # ---- the model route: fitted together on the fit part, scored with the model
    if model_route:
        mdets = [dets[i] for i in model_route]
        ok: list[int] = []
        try:
            mset = DetectorSet(mdets)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CalibrationWarning)
                mset.fit(
                    model, _FitPart(id_loader, holdout, seed, max_samples), adapter=adapter, tpr=tpr, progress=progress
                )
            ok = list(range(len(mdets)))
        except Exception:  # noqa: BLE001 - one by one, to find the bad ones
            for j, i in enumerate(model_route):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", CalibrationWarning)
                        mdets[j].fit(model, _FitPart(id_loader, holdout, seed, max_samples), adapter=adapter, tpr=tpr)
                    ok.append(j)
                except Exception as e:  # noqa: BLE001
                    cands[i].error = _short(e)
        scores: dict[int, dict[str, list[torch.Tensor]]] = {j: {k: [] for k in ["id", *kinds]} for j in ok}
        views.reset()
        n_model_held = n_model_fit = 0
        for b in stream.batches():
            h = heldout_mask(b.index, holdout, seed)
            n_model_fit += int((~h).sum())
            if not bool(h.any()) or not ok:
                continue
            hd = h.to(b.x.device)
            xh, ih = b.x[hd], b.index[h]
            xc = views(xh, ih)
            nb = xh.shape[0]
            n_model_held += nb
            for j in ok:
                try:
                    s = mdets[j].score(xc).detach().double().cpu()
                except Exception as e:  # noqa: BLE001
                    cands[model_route[j]].error = _short(e)
                    continue
                for t, k in enumerate(["id", *kinds]):
                    scores[j][k].append(s[t * nb : (t + 1) * nb])
        if not feat_route:
            n_fit, n_held = n_model_fit, n_model_held
            if n_held == 0:
                raise InputError(f"no ID sample was held out (holdout={holdout}); pass more ID data.")
        for j in ok:
            i = model_route[j]
            if cands[i].error is not None:
                continue
            try:
                s_id = torch.cat(scores[j]["id"])
                _metrics(s_id, {k: torch.cat(scores[j][k]) for k in kinds}, cands[i])
                consider(i, mdets[j], s_id)
            except Exception as e:  # noqa: BLE001
                cands[i].error = _short(e)

    ranking = sorted(cands, key=Candidate.key)
    for r, c in enumerate(ranking, 1):
        c.rank = r
    if ranking[0].error is not None or not math.isfinite(ranking[0].mean_auroc):
        raise ConfigError(
            "no candidate could be fitted and scored: "
            + "; ".join(f"{c.name} {c.params}: {c.error}" for c in ranking[:8])
        )
    sel = Selection(ranking, kinds, holdout, int(seed), n_fit, n_held, refit=refit)
    if refit is True:
        w = ranking[0]
        sel.best_ = create(w.name, **w.params).fit(model, id_loader, adapter=adapter, tpr=tpr, max_samples=max_samples)
    elif refit is False:
        det = keep["det"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            det.decision_ = Decision.calibrate(keep["s_id"].float(), tpr)
        sel.best_ = det
    return sel
