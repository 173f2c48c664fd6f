"""Atomic file writes: a reader never sees a half-written file.

:func:`atomic_write` writes to a temporary file beside the target (named for this process, so
concurrent writers do not share it) and renames it over the target; on failure the temporary
file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["atomic_write"]


def atomic_write(
    path: str | os.PathLike,
    data: bytes | str | Callable[[BinaryIO], object],
    *,
    encoding: str = "utf-8",
) -> None:
    """Write ``data`` to ``path`` atomically.

    ``data`` is the file's bytes, its text (encoded with ``encoding``) or a callback
    ``fn(f)`` that writes to the open binary file ``f`` (e.g. ``lambda f: torch.save(obj, f)``:
    a file object also keeps the archive's inner name fixed, so the bytes are reproducible).
    """
    target = os.fspath(path)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            elif isinstance(data, str):
                f.write(data.encode(encoding))
            else:
                f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
