"""What a benchmark run returns: :class:`BenchResult` (the runner makes it, the report writes it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BenchResult"]


@dataclass
class BenchResult:
    """The outcome: the JSON document (``results``), per-detector scores, and the output folder."""

    results: dict[str, Any]
    scores: dict[str, dict[str, np.ndarray]]
    out_dir: str | None

    @property
    def failed(self) -> list[str]:
        return [n for n, d in self.results["detectors"].items() if d.get("error") and not d.get("not_applicable")]
