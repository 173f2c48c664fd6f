"""Progress bars: tqdm when it is installed (it comes with timm), otherwise silent.

``enabled=None`` (the default of the long fits: ``Detector.fit``, ``DetectorSet.fit``,
``score_loader``, ``finetune``) means *interactive use only*: a bar when stderr is a terminal
(or in a Jupyter kernel), none in scripts whose output goes to a file, in CI and in tests.
"""

from __future__ import annotations

import sys
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def interactive() -> bool:
    """Whether a person watches stderr: it is a terminal, or this runs in a Jupyter kernel."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # replaced or closed stream
        return False
    return "ipykernel" in sys.modules


def progress_enabled(enabled: bool | None) -> bool:
    """``True``/``False`` as given; ``None``: :func:`interactive`."""
    return interactive() if enabled is None else bool(enabled)


def progress_bar(total: int | None = None, desc: str = "", enabled: bool | None = None, **kw: Any) -> Any:
    """A tqdm bar on stderr (``enabled=False``, ``None`` in non-interactive use, or no tqdm: a
    no-op object with the same methods)."""
    if not progress_enabled(enabled):
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with timm's dependencies
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)
