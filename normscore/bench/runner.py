"""The benchmark run behind ``normscore-bench``: data, model, features, detectors, metrics.

Order of work (each step shows a progress bar; the module doing it in brackets):

1. plan: resolve the suite, the OOD sets and (with ``search``) the validation sets, and check
   up front that the weights and every split are there ([plan], [preflight]);
2. build the model - load it, or train it on the ID training split (cached by recipe) - and load
   the splits: ``fit_size`` ID training images; with ``search`` also ``val_size`` other
   training images as validation ID (disjoint from the fit images) and the validation OOD set
   ([inputs]); plan how each detector runs, cached or live ([plan]);
3. extract: features are captured once per split through
   :class:`~normscore.bench.cache.FeatureCache` (the union of what every cached detector needs,
   so adding detectors later only captures the missing keys) ([extract]);
4. search and fit: **cached detectors** (``feature_only`` and no gradients) are fitted with
   ``fit_features`` on the fit split ([cached]); with ``search`` every combination of a
   detector's ``search_space`` is fitted and scored on validation ID vs validation OOD, and the
   highest AUROC wins (ties: the first in grid order) ([search]); the chosen values are used on
   the test sets and recorded;
5. score: cached detectors with ``score_features`` on the test features; **live detectors**
   (``feature_only=False``, e.g. ODIN's input perturbation or LDG's gradients, or several fit
   passes) search the same way, are fitted with ``fit(model, loader)`` and scored with
   ``score(x)`` batch by batch - their own model passes; their scores are cached per split
   ([live]); then metrics (:func:`normscore.metrics.evaluate`) per OOD set, means over near/far
   OOD, ID accuracy from the cached logits ([score]);
6. report: the JSON document ([document]), written with the tables and plots by
   :func:`normscore.bench.report.write_outputs`.

Detectors are fitted on all fit images (``calibration=0``: no threshold hold-out, since the
benchmark needs scores, not decisions); detectors without statistics are only attached.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from ..adapters import Adapter, get_adapter
from ..detectors.base import Detector
from ..detectors.registry import create
from ..errors import MissingResourceError
from ..progress import progress_bar
from ..taps import Features
from .cache import FeatureCache, spec_keys
from .cached import fit_cached, score_cached
from .config import BenchConfig, SplitRef, resolve_device, trains_model
from .document import build_result
from .extract import Extractor
from .inputs import build_bench_model, load_splits, model_name
from .live import LiveScorer
from .plan import DetectorRun, plan_detectors, plan_splits, short_error
from .preflight import missing_error, missing_pieces
from .report import write_json, write_outputs
from .result import BenchResult
from .score import add_metrics, id_accuracy
from .search import best_by_val_auroc, search_configs

__all__ = ["BenchConfig", "BenchResult", "SplitRef", "run_benchmark", "trains_model"]


def _log_fn(progress: bool | None) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if progress is not False:
            print(f"[normscore-bench] {msg}", file=sys.stderr, flush=True)

    return log


def _debug_trace() -> None:
    if os.environ.get("NORMSCORE_BENCH_DEBUG"):
        traceback.print_exc()


class _Run:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.train_seed = cfg.seed if cfg.train_seed is None else cfg.train_seed
        self.log = _log_fn(cfg.progress)
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # process CPU seconds (all threads) of the same stages
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

    # ------------------------------------------------------------------ the steps, in order
    def run(self) -> BenchResult:
        t_all, c_all = time.perf_counter(), time.process_time()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.plan = plan_splits(self.cfg)
        self.device = resolve_device(self.cfg.device)
        self.preflight()
        self.load_inputs()
        runs = plan_detectors(self.cfg.detectors, self.lm.model, self.adapter, self.log)
        cached = [r for r in runs if r.error is None and r.mode == "cached"]
        live = [r for r in runs if r.error is None and r.mode == "live"]
        configs = {r.name: search_configs(r.name, self.cfg.search) for r in runs if r.error is None}
        self.selection: dict[str, Any] | None = None
        if self.plan.pseudo_ood:
            with self._stage("select"):
                self.selection = self.select_pseudo(cached, live, configs)
        cached, fit_feats = self.extract_fit(cached, configs)
        val_feats = self.extract_val(cached, live, configs)
        self.search_and_fit_cached(cached, configs, fit_feats, val_feats)
        test_splits = ["id", *[x.label for x in self.plan.ood_refs]]
        test_feats = self.extract_test(cached, test_splits)
        self.score_cached(cached, test_feats, test_splits)
        self.run_live(live, configs, test_splits)
        self.id_accuracy = id_accuracy(test_feats["id"]["logits"], self.sets["id"].labels)
        add_metrics(runs, self.plan.ood_refs)
        self.timings["total"] = time.perf_counter() - t_all
        self.cpu["total"] = time.process_time() - c_all
        return self.document(runs, started)

    # ------------------------------------------------------------------ plan and inputs
    def _needed_splits(self) -> list[tuple[str, str]]:
        """Every ``(dataset, split)`` the run reads, in order."""
        p = self.plan
        out = [(self.cfg.id, p.train_split), (self.cfg.id, p.test_split)]
        out += [(r.dataset, r.split) for r in p.ood_refs]
        if p.val_ref is not None:
            out.append((p.val_ref.dataset, p.val_ref.split))
        return list(dict.fromkeys(out))

    def missing(self, *, load: bool) -> list[tuple[str, str]]:
        """``(what, problem)`` for every missing piece (see :func:`missing_pieces`)."""
        return missing_pieces(self.cfg, model_name(self.cfg, self.plan), self._needed_splits(), load=load)

    def preflight(self) -> None:
        """Check the weights and every data split before anything runs; raise one
        :class:`MissingResourceError` listing every missing piece."""
        if self.missing(load=False):
            raise missing_error(self.missing(load=True), ran=False)

    def load_inputs(self) -> None:
        """The model, the data splits, the adapter and the feature extractor."""
        try:
            with self._stage("model"):
                self.lm, self.num_classes = build_bench_model(
                    self.cfg,
                    self.plan,
                    train_seed=self.train_seed,
                    device=self.device,
                    cache_root=self.cache_root,
                    log=self.log,
                )
            fmt = self.lm.format
            self.log(
                f"model: {self.lm.name} ({self.lm.weights}, sha256 {self.lm.weights_sha256[:12]}), input "
                f"{fmt.channels}x{fmt.size[0]}x{fmt.size[1]} on {self.device}"
            )
            with self._stage("data"):
                self.sets, self.refs = load_splits(self.cfg, self.plan, fmt, self.log)
        except MissingResourceError as e:  # a set without a cheap check: report every missing piece
            raise missing_error(self.missing(load=True) or [("", str(e))], ran=True) from None
        self.adapter: Adapter = get_adapter(self.lm.model)
        x0 = self.sets["id"][0][0][None].to(self.device)
        self.adapter.ensure_resolved(x0)
        self.extractor = Extractor(self.cfg, self.fcache, self.adapter, self.lm, self.sets, self.refs, self.log)

    def _make(self, name: str, params: dict[str, Any]) -> Detector:
        return create(name, **params).attach(self.lm.model, self.adapter)

    # ------------------------------------------------------------------ search without OOD data
    def select_pseudo(
        self, cached: list[DetectorRun], live: list[DetectorRun], configs: dict[str, list[dict[str, Any]]]
    ) -> dict[str, Any]:
        """``--val-ood pseudo``: :func:`normscore.select` picks each detector's configuration
        with pseudo-OOD made from ID training images (cached detectors on the fit split, live ones
        on the live-fit split); ``configs`` keeps only the chosen one. Returns the evidence of
        each selection (``results.json`` ``selection``)."""
        from torch.utils.data import DataLoader

        from ..select import select

        out: dict[str, Any] = {}
        for route, rs, split in (("cached", cached, "fit"), ("live", live, "live-fit")):
            rs = [r for r in rs if r.error is None]
            if not rs:
                continue
            cands = [(r.name, c) for r in rs for c in configs[r.name]]
            loader = DataLoader(
                self.sets[split], batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.workers
            )
            self.log(f"select ({route}): {len(cands)} configurations of {len(rs)} detectors on pseudo-OOD")
            try:
                sel = select(
                    self.lm.model,
                    loader,
                    cands,
                    adapter=self.adapter,
                    seed=self.cfg.seed,
                    refit=None,
                    progress=self.cfg.progress,
                )
            except Exception as e:  # noqa: BLE001 - every candidate failed: each detector says why
                for r in rs:
                    r.error = f"selection failed: {short_error(e)}"
                continue
            for r in rs:
                rows = sorted(sel.for_detector(r.name), key=lambda c: c.order)
                if len(rows) > 1:
                    r.search = [
                        {"params": c.params, "val_auroc": c.mean_auroc, "pseudo_auroc": c.auroc, "rank": c.rank}
                        for c in rows
                    ]
                best = min(rows, key=lambda c: c.rank)
                if best.error is not None:
                    r.error = f"no configuration could be scored on pseudo-OOD: {best.error}"
                    continue
                configs[r.name] = [dict(best.params)]
            out[route] = {"split": split, **sel.evidence}
        return out

    # ------------------------------------------------------------------ extract
    def extract_fit(
        self, cached: list[DetectorRun], configs: dict[str, list[dict[str, Any]]]
    ) -> tuple[list[DetectorRun], Features]:
        """The fit split: one pass for every cached detector and configuration."""
        fit_keys: set[str] = set()
        for r in cached:
            try:
                for c in configs[r.name]:
                    det = self._make(r.name, c)
                    if det.needs_fit:
                        fit_keys |= spec_keys(det.capture_spec(self.adapter, "fit"), self.adapter)
            except Exception as e:  # noqa: BLE001
                r.error = short_error(e)
        cached = [r for r in cached if r.error is None]
        with self._stage("features_fit"):
            if fit_keys:
                return cached, self.extractor.features("fit", fit_keys)
            return cached, Features(labels=self.sets["fit"].labels.clone())

    def extract_val(
        self, cached: list[DetectorRun], live: list[DetectorRun], configs: dict[str, list[dict[str, Any]]]
    ) -> dict[str, Features]:
        """The validation splits (search): pre-fit score keys of every configuration."""
        val_feats: dict[str, Features] = {}
        if self.plan.val_ref is None or not any(len(configs[r.name]) > 1 for r in cached + live):
            return val_feats
        keys: set[str] = set()
        for r in cached:
            if len(configs[r.name]) > 1:
                for c in configs[r.name]:
                    try:
                        keys |= spec_keys(self._make(r.name, c).capture_spec(self.adapter, "score"), self.adapter)
                    except Exception:  # noqa: BLE001 - known only after fitting
                        pass
        with self._stage("features_val"):
            for k in ("val-id", "val-ood"):
                val_feats[k] = self.extractor.features(k, keys | {"logits"})
        return val_feats

    def extract_test(self, cached: list[DetectorRun], test_splits: list[str]) -> dict[str, Features]:
        """The test splits: one pass each, union of the chosen detectors' score keys (+ logits)."""
        test_keys: set[str] = {"logits"}
        for r in cached:
            if r.error is None and r.det is not None:
                try:
                    test_keys |= spec_keys(r.det.capture_spec(self.adapter, "score"), self.adapter)
                except Exception as e:  # noqa: BLE001
                    r.error = short_error(e)
        test_feats: dict[str, Features] = {}
        any_cached = any(r.error is None for r in cached)
        with self._stage("features_test"):
            for k in test_splits if any_cached else ["id"]:  # ID logits give the accuracy
                test_feats[k] = self.extractor.features(k, test_keys)
        return test_feats

    # ------------------------------------------------------------------ search and fit
    def _fit(self, name: str, params: dict[str, Any], fit_feats: Features) -> Detector:
        return fit_cached(self._make(name, params), fit_feats, len(self.sets["fit"]), self.adapter, self.device)

    def _score(self, det: Detector, feats: Features) -> Any:
        return score_cached(det, feats, self.adapter, self.device)

    def search_and_fit_cached(
        self,
        cached: list[DetectorRun],
        configs: dict[str, list[dict[str, Any]]],
        fit_feats: Features,
        val_feats: dict[str, Features],
    ) -> None:
        """Fit each cached detector; with several configurations, keep the best on validation."""
        t_det, c_det = time.perf_counter(), time.process_time()
        bar = progress_bar(total=len(cached), desc="fit detectors", enabled=self.cfg.progress, unit="det")
        for r in cached:
            t0 = time.perf_counter()
            try:
                cands = configs[r.name]
                if len(cands) == 1:
                    r.det = self._fit(r.name, cands[0], fit_feats)
                else:

                    def val_scores(c: dict[str, Any], name: str = r.name) -> tuple[Any, Any, Detector]:
                        det = self._fit(name, c, fit_feats)
                        need = spec_keys(det.capture_spec(self.adapter, "score"), self.adapter)
                        for k in ("val-id", "val-ood"):
                            if need - set(val_feats[k]):
                                val_feats[k] = self.extractor.features(k, set(val_feats[k]) - {"labels"} | need)
                        return self._score(det, val_feats["val-id"]), self._score(det, val_feats["val-ood"]), det

                    best = best_by_val_auroc(cands, val_scores, r.search)
                    if best is None:
                        raise RuntimeError(
                            "no configuration could be scored on the validation sets (non-finite scores)"
                        )
                    r.det = best[1]
                r.params = r.det.get_params()
            except Exception as e:  # noqa: BLE001
                r.error = short_error(e)
                self.log(f"detector {r.name}: fit failed: {r.error}")
                _debug_trace()
            r.seconds["fit"] = time.perf_counter() - t0
            bar.update(1)
        bar.close()
        self._add("detectors_fit", t_det, c_det)

    # ------------------------------------------------------------------ score
    def score_cached(self, cached: list[DetectorRun], test_feats: dict[str, Features], test_splits: list[str]) -> None:
        """Score each fitted cached detector on the test features."""
        t_det, c_det = time.perf_counter(), time.process_time()
        bar = progress_bar(total=len(cached), desc="score detectors", enabled=self.cfg.progress, unit="det")
        for r in cached:
            if r.error is None:
                t0 = time.perf_counter()
                try:
                    assert r.det is not None
                    for k in test_splits:
                        r.scores[k] = self._score(r.det, test_feats[k])
                except Exception as e:  # noqa: BLE001
                    r.error = short_error(e)
                    self.log(f"detector {r.name}: scoring failed: {r.error}")
                r.seconds["score"] = time.perf_counter() - t0
            bar.update(1)
        bar.close()
        self._add("detectors_score", t_det, c_det)

    def run_live(
        self, live: list[DetectorRun], configs: dict[str, list[dict[str, Any]]], test_splits: list[str]
    ) -> None:
        """Search, fit and score each live detector with the model (see :mod:`.live`)."""
        scorer = LiveScorer(
            self.cfg, self.lm, self.adapter, self.sets, self.refs, self.extractor.split_key, self.cache_root
        )
        for r in live:
            t_det, c_det = time.perf_counter(), time.process_time()
            try:
                scorer.run(r, configs[r.name], test_splits)
            except Exception as e:  # noqa: BLE001
                r.error = short_error(e)
                self.log(f"detector {r.name} (live): failed: {r.error}")
                _debug_trace()
            self._add(f"live:{r.name}", t_det, c_det)

    # ------------------------------------------------------------------ report
    def document(self, runs: list[DetectorRun], started: str) -> BenchResult:
        return build_result(
            cfg=self.cfg,
            plan=self.plan,
            runs=runs,
            started=started,
            device=self.device,
            lm=self.lm,
            num_classes=self.num_classes,
            id_accuracy=self.id_accuracy,
            sets=self.sets,
            refs=self.refs,
            split_info=self.extractor.split_info,
            train_seed=self.train_seed,
            cache_root=self.cache_root,
            timings=self.timings,
            cpu=self.cpu,
            selection=self.selection,
        )


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
