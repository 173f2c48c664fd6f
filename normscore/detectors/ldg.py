"""Low-dimensional gradients (LDG; Wu et al., TPAMI 2024, arXiv:2310.17163): per-sample parameter
gradients projected on their principal ID subspace, scored by k-NN, a linear probe, an ensemble or
any feature-space detector (:mod:`.ldg_scoring`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError, NotFittedError
from ..stats import RunningMoments
from ..stream import FitStream
from ..taps import CaptureSpec, Features, capture
from . import sync
from .base import Detector
from .constraints import Constraint, Interval, OneOf
from .engines.gradstream import GradOperator, GradPasses, GradStats
from .engines.knn import KNNBank
from .engines.layers import resolve_layers, slots_from_names
from .engines.persample import ExactGradients, KroneckerSketch, LayerMap, SketchShape, plan_sketch
from .engines.subspace import randomized_subspace
from .ldg_scoring import (
    DETECTOR_SCORINGS,
    NATIVE_SCORINGS,
    REFUSED_SCORINGS,
    _Scoring,
    _ScoringParams,
    fit_on_rows,
    scoring_detector,
)
from .registry import register

__all__ = ["DETECTOR_SCORINGS", "LDG", "NATIVE_SCORINGS", "REFUSED_SCORINGS", "fit_on_rows"]


class _ParamSpec(Constraint):
    def check(self, name: str, value: Any) -> None:
        if isinstance(value, str) and value in ("all", "head"):
            return
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
            return
        raise ConfigError(
            f"hyperparameter {name}={value!r} must be 'all', 'head', an int k >= 1 (the last k blocks "
            "and the head) or a non-empty list of module names."
        )


_DENSE_MAX_DIM = 2048


def _zero_variance(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Coordinates whose ID gradient is constant (up to float32 rounding of the mean)."""
    return var <= (1e-6 * mean.abs()) ** 2 + 1e-36


def _canonical_signs(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each column so that its largest-magnitude entry is positive (eigenvectors are only
    defined up to sign; this makes fits reproducible across solvers, shardings and runs)."""
    idx = v.abs().argmax(dim=0)
    sign = torch.sign(v.gather(0, idx[None, :]))[0]
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return v * sign[None, :], sign


def _train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """BatchNorm1d(K) + Linear(K, C) trained with cross-entropy, as in the LDG code: 10 epochs,
    SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 16. Seeded; the global RNG is not used."""
    g = torch.Generator().manual_seed(int(seed))
    x = x.float().cpu()
    y = y.long().cpu()
    n, k = x.shape
    bound = 1.0 / math.sqrt(k)
    w = ((torch.rand(num_classes, k, generator=g) * 2 - 1) * bound).requires_grad_(True)
    b = ((torch.rand(num_classes, generator=g) * 2 - 1) * bound).requires_grad_(True)
    gamma = torch.ones(k, requires_grad=True)
    beta = torch.zeros(k, requires_grad=True)
    rmean, rvar = torch.zeros(k), torch.ones(k)
    opt = torch.optim.SGD([gamma, beta, w, b], lr=0.1, momentum=0.9, weight_decay=5e-4)
    with torch.enable_grad():
        for _ in range(10):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, 16):
                idx = perm[i : i + 16]
                if idx.numel() < 2:
                    continue
                xb = F.batch_norm(x[idx], rmean, rvar, gamma, beta, training=True, momentum=0.1)
                loss = F.cross_entropy(xb @ w.t() + b, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return {
        "bn_mean": rmean,
        "bn_var": rvar,
        "bn_weight": gamma.detach().clone(),
        "bn_bias": beta.detach().clone(),
        "weight": w.detach().clone(),
        "bias": b.detach().clone(),
    }


@register
class LDG(Detector):
    """Low-dimensional gradients (Wu et al., "Low-Dimensional Gradient Helps Out-of-Distribution
    Detection", arXiv:2310.17163, TPAMI 2024).

    With ``f(x) = logsumexp(z(x))`` (no label), ``g(x) = grad_theta f(x)`` per sample (model in
    eval mode) and the NFK normalisation fitted on ID training data::

        mu = mean_i g(x_i),   sigma^2 = mean_i (g(x_i) - mu)^2      (element-wise)
        v(x) = (g(x) - mu) / sigma          (coordinates with zero ID variance are dropped)
        G_low(x) = v(x)^T V  in R^K,   V = top-K principal directions of {v(x_i)}

    The representation is computed as ``G_low(x) = <g(x), V/sigma> - <mu, V/sigma>`` from one
    batched backward pass: every layer's per-sample gradient is formed in closed form from its
    captured input and output gradient and multiplied by its rows of ``V/sigma`` at once
    (:mod:`normscore.detectors.engines.persample`). ``transform(x)`` returns ``G_low(x)``.

    Scores (higher = more ID): ``"knn"`` (default) ``-||u - u_(k)||`` with ``u`` the
    L2-normalised ``G_low`` and ``u_(k)`` its k-th nearest ID-train neighbour; ``"probe_msp"`` /
    ``"probe_energy"``: a BatchNorm + Linear probe trained on ID-train ``G_low`` with labels,
    then MSP / energy of its logits; ``"ensemble"``: the gradient KNN score plus the KNN score
    of the L2-normalised penultimate features (forward + backward). The fit prepares every
    scoring it can (the probe when the loader has labels; the penultimate bank when the model
    has a linear head), so ``set_params(scoring=...)`` switches without refitting.

    **Any feature-space detector** (``scoring=NAME``, NAME in :data:`DETECTOR_SCORINGS`:
    mahalanobis, rmds, their ``_pp`` variants, vim, residual, she, nnguide, gmm, neco, cfood,
    relation, grood): the detector ``create(NAME, **scoring_params)`` is fitted on the ID bank,
    ``fit_features(Features(penultimate=G_low(x_i), logits=z(x_i), labels=y_i))``, and scores
    ``Features(penultimate=G_low(x), logits=z(x))`` (``z`` the model's logits). The bank's rows
    are the exact projections of the fit samples, so this costs no extra pass. ViM and Residual
    take the ID mean of ``G_low`` (``0`` by construction) as their origin, since ``G_low`` has no
    head to give ``-pinv(W) b``; detectors that need the head or the model are refused
    (:data:`REFUSED_SCORINGS`). The scoring detector's state is saved inside LDG's.

    Hyperparameters
    ---------------
    n_components: K. ``None`` = ``min(200, N - 1, dim)`` (200 as in the paper, capped by the
        number of fit samples ``N``); an explicit K larger than ``N`` or ``dim`` is an error.
    params: parameter set: ``"all"`` (the paper), ``"head"``, int ``k`` (last ``k`` blocks and
        what follows them), or a list of module names.
    subspace: ``"pca"`` or ``"class_mean"`` (V = L2-normalised NFK-normalised class-mean
        gradients, K = number of classes; needs labels; the paper's ImageNet variant).
    method: ``"exact"`` or ``"sketch"`` (Kronecker-factored random projection of each layer's
        gradient to ``sketch_dim`` dimensions in total; NFK statistics and PCA in that space).
    solver: ``"dense"`` (covariance + eigh, one pass; used by ``"auto"`` when the feature
        dimension is at most 2048) or ``"randomized"`` (streamed subspace iteration with
        ``n_iter`` power iterations and ``oversample`` extra columns; ``2 n_iter + 2`` passes).
    max_fit_samples: cap on the ID samples used (the paper: 50,000).
    """

    name = "ldg"
    paper = "Wu et al., TPAMI 2024, arXiv:2310.17163"
    formula = "KNN on G_low = ((grad_theta logsumexp(z) - mu)/sigma)^T V, V = top-K PCs of ID gradients"
    needs_fit = True
    fit_mode = "multi_pass"  # pass 1: gradient statistics; then the ID bank of projections
    needs_gradients = True
    feature_only = False
    constraints = {
        "n_components": Interval(1, math.inf, integer=True, allow_none=True),
        "params": _ParamSpec(),
        "subspace": OneOf(("pca", "class_mean")),
        "method": OneOf(("exact", "sketch")),
        "scoring": _Scoring(),
        "scoring_params": _ScoringParams(),
        "k": Interval(1, math.inf, integer=True),
        "n_iter": Interval(0, 100, integer=True),
        "oversample": Interval(0, 10_000, integer=True),
        "sketch_dim": Interval(1, math.inf, integer=True),
        "solver": OneOf(("auto", "dense", "randomized")),
        "max_fit_samples": Interval(1, math.inf, integer=True, allow_none=True),
        "seed": Interval(0, 2**62, integer=True),
    }

    def __init__(
        self,
        n_components: int | None = None,
        params: str | int | Sequence[str] = "all",
        subspace: str = "pca",
        method: str = "exact",
        scoring: str = "knn",
        scoring_params: Mapping[str, Any] | None = None,
        k: int = 5,
        n_iter: int = 3,
        oversample: int = 10,
        sketch_dim: int = 1024,
        solver: str = "auto",
        max_fit_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n_components = n_components
        self.params = list(params) if isinstance(params, tuple) else params
        self.subspace = subspace
        self.method = method
        self.scoring = scoring
        self.scoring_params = dict(scoring_params) if isinstance(scoring_params, Mapping) else scoring_params
        self.k = k
        self.n_iter = n_iter
        self.oversample = oversample
        self.sketch_dim = sketch_dim
        self.solver = solver
        self.max_fit_samples = max_fit_samples
        self.seed = seed
        self._key = f"ldg_proj_{id(self):x}"
        self._scorer: Detector | None = None  # the detector fitted on G_low (scoring=NAME)

    # ------------------------------------------------------------------ the scoring detector
    def _check_params(self) -> None:
        super()._check_params()
        if self.scoring in NATIVE_SCORINGS:
            if self.scoring_params:
                raise ConfigError(
                    f"ldg: scoring_params={self.scoring_params!r} set the hyperparameters of a detector scoring, "
                    f"but scoring={self.scoring!r} is LDG's own (its hyperparameter is k=). Use scoring_params "
                    f"with a detector scoring: {list(DETECTOR_SCORINGS)}."
                )
            return
        try:
            scoring_detector(self.scoring, self.scoring_params)
        except ConfigError as e:
            raise ConfigError(f"ldg scoring={self.scoring!r}, scoring_params={self.scoring_params!r}: {e}") from None

    def set_params(self, **params: Any) -> LDG:
        super().set_params(**params)
        sc = self._scorer
        if sc is not None and sc.name == self.scoring and ("scoring" in params or "scoring_params" in params):
            # the fitted scoring detector takes the new hyperparameters (its own set_params rules)
            sc.set_params(**scoring_detector(self.scoring, self.scoring_params).get_params())
        return self

    def _reset_fitted(self) -> None:
        super()._reset_fitted()
        self._scorer = None

    def _bind(self, model, adapter=None) -> LDG:
        super()._bind(model, adapter)
        if self._scorer is not None:
            self._scorer._bind(model, self._adapter)
        return self

    def to(self, device: torch.device | str) -> LDG:
        super().to(device)
        if self._scorer is not None:
            self._scorer.to(device)
        return self

    @property
    def scoring_detector_(self) -> Detector | None:
        """The detector fitted on ``G_low`` (``scoring=NAME``), else ``None``."""
        return self._scorer

    def _scoring_det(self) -> Detector:
        sc = self._scorer
        if sc is None or sc.name != self.scoring:
            fitted = "none" if sc is None else repr(sc.name)
            raise ConfigError(
                f"ldg: scoring={self.scoring!r} is a detector fitted on the gradient features during fit, but this "
                f"LDG was fitted with {fitted} (the scorings {list(NATIVE_SCORINGS)} need no refit). Refit "
                "(det.fit(model, id_loader)) with this scoring."
            )
        return sc

    # ------------------------------------------------------------------ derived state
    # The layer map and the neighbour banks are rebuilt from fitted state through
    # ``Detector._memo``: keyed by the adapter (a new model) and the fitted tensors (new on fit,
    # load and ``to``), so they are rebuilt exactly when those change.
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self._scorer is not None:  # the scoring detector's own state, as fusion keeps its members'
            sd["fitted"]["scoring_state_"] = self._scorer.state_dict()
        return sd

    def load_state_dict(self, state, *, strict: bool = True) -> None:
        state = dict(state)
        fitted = dict(state.get("fitted", {}))
        inner = fitted.pop("scoring_state_", None)
        state["fitted"] = fitted
        self._scorer = None
        super().load_state_dict(state, strict=strict)
        if inner is not None:
            sc = scoring_detector(inner["detector"], inner.get("params"))
            sc.load_state_dict(inner)  # unbound: LDG's fingerprint was checked
            sc.shape_bound = frozenset()
            self._scorer = sc
            if self._model is not None:
                sc._bind(self._model, self._adapter)
        # fresh allocations: BLAS results depend on memory alignment, and loaded tensors may be
        # views into a file buffer; cloning makes scores after load bitwise equal to the originals
        for obj in (self, self._scorer):
            for k, v in list(vars(obj).items()) if obj is not None else ():
                if k.endswith("_") and not k.startswith("_") and isinstance(v, torch.Tensor):
                    setattr(obj, k, v.clone())

    def _layer_map_key(self) -> tuple:
        shapes_ = getattr(self, "sketch_shapes_", None)
        return (
            self.adapter,
            tuple(self.layer_names_),
            tuple(int(d) for d in self.layer_sizes_),
            self.method,
            None if shapes_ is None else tuple(tuple(int(v) for v in t) for t in shapes_),
            int(self.seed),
        )

    def _layer_map(self) -> LayerMap:
        return self._memo("layer_map", self._layer_map_key(), self._rebuild_layer_map)

    def _rebuild_layer_map(self) -> LayerMap:
        slots = slots_from_names(self.adapter, self.layer_names_)
        if self.method == "sketch":
            shapes = [SketchShape(*map(int, t)) for t in self.sketch_shapes_]
            lmap: LayerMap = KroneckerSketch(slots, shapes, seed=int(self.seed))
        else:
            lmap = ExactGradients(slots)
        if [int(d) for d in lmap.dims] != [int(d) for d in self.layer_sizes_]:
            raise ConfigError(
                "the model's layers do not match the fitted LDG state (different parameter sizes); "
                "attach the model the detector was fitted on."
            )
        return lmap

    # ------------------------------------------------------------------ specs
    def capture_spec(self, adapter, stage):
        if stage == "calibrate":
            return None  # the projection needs the fitted subspace: one extra pass after fitting
        if getattr(self, "components_", None) is None:
            raise NotFittedError("ldg is not fitted yet. Call det.fit(model, id_loader) first.")
        bw = self._layer_map().projection_spec(self.components_, self._key)
        return CaptureSpec(logits=True, penultimate=self.scoring == "ensemble", backward=bw)

    # ------------------------------------------------------------------ fit
    def fit_needs_labels(self) -> bool:
        if self.scoring in DETECTOR_SCORINGS and scoring_detector(self.scoring, self.scoring_params).fit_needs_labels():
            return True
        return self.scoring in ("probe_msp", "probe_energy") or self.subspace == "class_mean"

    def _fit(self, stream: FitStream) -> None:  # None: the base calibrates in one extra pass
        adapter = stream.adapter
        dev = next(iter(adapter.model.parameters()), torch.empty(0)).device
        passes = GradPasses(stream, self.max_fit_samples)
        need_labels = self.fit_needs_labels()
        keep_feats = False  # the penultimate bank (ensemble), when the model has a linear head
        scorer = scoring_detector(self.scoring, self.scoring_params) if self.scoring in DETECTOR_SCORINGS else None
        keep_logits = scorer is not None and scorer.capture_spec(adapter, "fit").logits  # the scorer's fit logits
        fit_logits: list[torch.Tensor] = []
        labelled = None
        lmap: LayerMap | None = None
        dense = False
        rm_full: RunningMoments | None = None
        rms: list[RunningMoments] = []
        csum: torch.Tensor | None = None
        ccount: torch.Tensor | None = None
        fps, labels, pens, positions = [], [], [], []
        num_classes = 0

        # ---- pass 1: NFK statistics (and class sums, labels, penultimate features)
        for _, b in passes.batches():
            if lmap is None:
                lmap, res = self._build_map(adapter, b.x)
                dense = self.subspace == "pca" and (
                    self.solver == "dense" or (self.solver == "auto" and lmap.dim <= _DENSE_MAX_DIM)
                )
                if dense:
                    rm_full = RunningMoments(lmap.dim)
                else:
                    rms = [RunningMoments(d, diagonal=True) for d in lmap.dims]
                if self.subspace == "class_mean":
                    num_classes = int(adapter.num_classes or 0)
                    csum = torch.zeros(lmap.dim, num_classes)
                    ccount = torch.zeros(num_classes, dtype=torch.float64)
            if labelled is None:
                labelled = b.y is not None
                adapter.ensure_resolved(b.x)
                keep_feats = adapter.has_head
            if need_labels and b.y is None:
                raise InputError(
                    f"ldg with subspace={self.subspace!r} and scoring={self.scoring!r} needs class labels, but "
                    "the loader yields none. Use a loader of (x, y) pairs of ID training data."
                )
            bsz = b.x.shape[0]
            onehot = None
            if csum is not None:
                yl = b.y.cpu()
                if int(yl.min()) < 0 or int(yl.max()) >= num_classes:
                    raise InputError(f"labels must be in [0, {num_classes}) for subspace='class_mean'.")
                onehot = F.one_hot(yl, num_classes).float()
                ccount += onehot.double().sum(0)
            acc = GradStats(lmap, rm_full, rms, csum, onehot, bsz)
            f = lmap.run(adapter, b.x, acc, extra=CaptureSpec(logits=True, penultimate=keep_feats))
            acc.finish()
            fps.append(torch.logsumexp(f["logits"].double().cpu(), dim=1))
            if keep_logits:
                fit_logits.append(f["logits"].float().cpu())
            positions.append(b.index.cpu())
            if labelled and b.y is not None:
                labels.append(b.y.cpu())
            if keep_feats:
                pens.append(f["penultimate"].float().cpu())
        if lmap is None:
            raise InputError("ldg saw no fit samples; pass a loader with ID training data.")
        passes.fingerprint = torch.cat(fps)
        n_local = int(passes.fingerprint.shape[0])

        if dense:
            sync.reduce(rm_full, "moments")
            n = rm_full.n
            mean, var = rm_full.mean, torch.diagonal(rm_full.m2) / max(n, 1)
        else:
            for r in rms:
                sync.reduce(r, "moments")
            n = rms[0].n
            mean = torch.cat([r.mean for r in rms])
            var = torch.cat([r.m2 for r in rms]) / max(n, 1)
        zero = _zero_variance(mean, var)
        inv_std = torch.where(zero, torch.zeros_like(var), 1.0 / var.clamp_min(1e-300).sqrt())
        n_support = int((~zero).sum())
        if n_support == 0:
            raise InputError("every gradient coordinate is constant over the ID fit samples; nothing to project.")

        # ---- the subspace
        bank = None
        if self.subspace == "class_mean":
            assert csum is not None and ccount is not None
            sync.reduce((csum, ccount), "sum")
            present = (ccount > 0).nonzero().flatten()
            means = csum[:, present].double() / ccount[present][None, :]
            v = (means - mean[:, None]) * inv_std[:, None]
            v = v / v.norm(dim=0, keepdim=True).clamp_min(1e-30)
            comps = v.float()
            svals = torch.zeros(comps.shape[1], dtype=torch.float64)
            self.classes_ = present.tolist()
        else:
            kk = self._n_components(n, lmap.dim, n_support)
            if dense:
                cov = rm_full.m2 / max(n, 1)
                cov = cov * inv_std[:, None] * inv_std[None, :]
                evals, evecs = torch.linalg.eigh(cov)
                evals, evecs = evals.flip(0)[:kk].clamp_min(0), evecs.flip(1)[:, :kk]
                comps = evecs.float()
                svals = (evals * n).sqrt()
            else:
                op = GradOperator(lmap, adapter, passes, mean, inv_std, n, n_local, dev)
                comps, svals, ylow = randomized_subspace(
                    op, kk, oversample=int(self.oversample), n_iter=int(self.n_iter), seed=int(self.seed), device=dev
                )
                bank = ylow.float()
            comps, flip = _canonical_signs(comps)
            if bank is not None:
                bank = bank * flip.to(bank.device)
        folded = (comps.to(dev) * inv_std.float().to(dev)[:, None]).contiguous()  # row-major: layer row blocks
        mean32 = mean.float().to(dev)
        offset = torch.zeros(folded.shape[1], dtype=torch.float64, device=dev)
        for r in range(0, folded.shape[0], 4096):
            offset += (mean32[r : r + 4096] @ folded[r : r + 4096]).double()
        offset = offset.float()

        self.layer_names_ = lmap.names
        self.layer_sizes_ = [int(d) for d in lmap.dims]
        if isinstance(lmap, KroneckerSketch):
            self.sketch_shapes_ = [[sh.r_o, sh.r_i, sh.r_v] for sh in lmap.shapes]
        self.excluded_parameters_ = sorted(res.excluded)
        self.dim_ = int(lmap.dim)
        self.solver_ = "class_mean" if self.subspace == "class_mean" else ("dense" if dense else "randomized")
        self.n_components_ = int(comps.shape[1])
        self.grad_mean_ = mean.float()
        self.inv_std_ = inv_std.float()
        self.components_ = folded
        self.offset_ = offset
        self.singular_values_ = svals.float()
        self.explained_variance_ratio_ = (svals.double() ** 2 / max(n, 1) / n_support).float()
        self.n_zero_variance_ = int(zero.sum())
        self._memo("layer_map", self._layer_map_key(), lambda: lmap)  # the fit's map (probed call counts)

        # ---- the ID bank (exact projections of the fit samples)
        if bank is None:
            parts = []
            bw_key = self._key
            for row0, b in passes.batches():
                f = capture(adapter, b.x, self.capture_spec(adapter, "score"), validated=True)
                passes.check(row0, f["logits"])
                parts.append((f[bw_key].float() - self.offset_).cpu())
            bank = torch.cat(parts)
        # under torch.distributed: every rank's fit samples, in global position order
        extra = ([torch.cat(pens)] if keep_feats else []) + ([torch.cat(labels)] if labels else [])
        extra += [torch.cat(fit_logits)] if keep_logits else []
        bank, *extra = sync.gather_in_order(torch.cat(positions), bank.cpu(), *extra)
        if bank.shape[0] < int(self.k):
            raise InputError(
                f"k={self.k} nearest neighbours requested but only {bank.shape[0]} ID samples were fitted; "
                "lower k or fit on more data."
            )
        self.bank_ = bank
        if keep_feats:
            self.feature_bank_ = extra.pop(0)
        y = extra.pop(0) if labels else None
        if y is not None and int(y.min()) >= 0:  # the probe is its own classifier over the labels given
            ncls = max(int(adapter.num_classes or 0), int(y.max()) + 1)
            for key, val in _train_probe(bank, y, ncls, int(self.seed)).items():
                setattr(self, f"probe_{key}_", val)
        if scorer is not None:
            # the scoring detector on the bank: every rank's rows in global order (gathered above), so
            # it is fitted without any cross-rank reduction and is the same on every rank
            rows = Features(penultimate=bank)
            if keep_logits:
                rows["logits"] = extra.pop(0)
            if y is not None:
                rows["labels"] = y
            fit_on_rows(scorer, rows, adapter)
            scorer._bind(adapter.model, adapter)
            self._scorer = scorer
        self.to(dev)

    def _n_components(self, n: int, dim: int, support: int) -> int:
        if self.n_components is None:
            return max(1, min(200, n - 1, dim, support))
        kk = int(self.n_components)
        if kk > n:
            raise InputError(
                f"ldg: n_components={kk} principal directions need at least {kk} ID samples, but only {n} were "
                "fitted. Fit on more samples or lower n_components."
            )
        if kk > dim:
            raise InputError(
                f"ldg: n_components={kk} exceeds the dimension of the gradient representation ({dim}); lower it."
            )
        return kk

    def _build_map(self, adapter, x1: torch.Tensor):
        res = resolve_layers(adapter, self.params, x1)
        if res.excluded and self.params == "all":
            shown = ", ".join(sorted(res.excluded)[:5])
            warnings.warn(
                f"ldg: {len(res.excluded)} parameter tensors have no per-sample gradient in the layer engine and "
                f"are left out (e.g. {shown}); see det.excluded_parameters_ and docs/seed-methods.md.",
                stacklevel=4,
            )
        if self.method == "sketch":
            shapes = plan_sketch(res.slots, int(self.sketch_dim))
            return KroneckerSketch(res.slots, shapes, seed=int(self.seed)), res
        return ExactGradients(res.slots), res

    # ------------------------------------------------------------------ score
    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """``G_low(x)`` ``[B, K]``: the NFK-normalised gradient projected on the ID subspace."""
        self._check_fitted()
        feats = capture(self.adapter, x, self.capture_spec(self.adapter, "score"))
        return self._glow(feats)

    def _glow(self, feats: Features) -> torch.Tensor:
        return feats.require(self._key).float() - self.offset_.to(feats[self._key].device)

    def _knn(self, which: str) -> KNNBank:
        rows = self.bank_ if which == "grad" else self.feature_bank_

        def build() -> KNNBank:
            bank = KNNBank(normalize=True)
            bank.add(rows)
            bank.build()
            return bank

        return self._memo(f"knn_{which}", (rows,), build)

    def score_features(self, feats: Features) -> torch.Tensor:
        z = self._glow(feats)
        if self.scoring in DETECTOR_SCORINGS:
            return self._scoring_det().score_features(Features(penultimate=z, logits=feats.require("logits")))
        k = int(self.k)
        if self.scoring == "knn":
            return -self._knn("grad").kth_distance(z, k)
        if self.scoring == "ensemble":
            if getattr(self, "feature_bank_", None) is None:
                raise ConfigError(
                    "scoring='ensemble' needs the penultimate features, but the model has no linear head."
                )
            h = feats.require("penultimate").float()
            return -self._knn("grad").kth_distance(z, k) - self._knn("feat").kth_distance(h, k)
        if getattr(self, "probe_weight_", None) is None:
            raise ConfigError(
                f"scoring={self.scoring!r} needs the linear probe, which is trained only when the fit loader "
                "yields labels; refit with a labelled ID loader."
            )
        zz = F.batch_norm(
            z,
            self.probe_bn_mean_.to(z.device),
            self.probe_bn_var_.to(z.device),
            self.probe_bn_weight_.to(z.device),
            self.probe_bn_bias_.to(z.device),
            training=False,
        )
        logits = zz @ self.probe_weight_.to(z.device).t() + self.probe_bias_.to(z.device)
        if self.scoring == "probe_msp":
            return torch.softmax(logits, dim=1).amax(dim=1)
        return torch.logsumexp(logits, dim=1)
