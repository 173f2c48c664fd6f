"""``normscore-bench``: offline OOD benchmarks with an on-disk feature cache.

>>> from normscore.bench import BenchConfig, run_benchmark
>>> res = run_benchmark(BenchConfig(detectors="msp,energy", limit=500, out="results"))
>>> res.results["detectors"]["energy"]["metrics"]["far"]["auroc"]

Modules: :mod:`~normscore.bench.runner` (the run, step by step: ``config``, ``plan``,
``preflight``, ``inputs``, ``extract``, ``cached``, ``search``, ``live``, ``score``, ``document``), :mod:`~normscore.bench.cache` (features on
disk), :mod:`~normscore.bench.models` (model names, weights, training cache),
:mod:`~normscore.bench.suites` (default OOD sets per ID set), :mod:`~normscore.bench.report`
(table, CSV, JSON, plots), :mod:`~normscore.bench.cli` (the command line).
"""

from .runner import BenchConfig, BenchResult, run_benchmark

__all__ = ["BenchConfig", "BenchResult", "run_benchmark"]
