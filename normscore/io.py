"""The detector file format: tensors and JSON without pickle (the detectors layer decides what to
save and load: :mod:`normscore.detectors.persistence`).

File layout (all integers little-endian)::

    8 bytes   magic  b"\\x89NSCORE\\n"
    8 bytes   header length H (uint64)
    H bytes   header: UTF-8 JSON {"format_version", "normscore_version", "kind", "state",
              "tensors": {key: {"dtype", "shape", "offset", "nbytes"}}, "data_nbytes"}
    ...       raw tensor bytes (C order, little-endian)
    32 bytes  SHA-256 of everything before it

The state is JSON; every tensor in it is replaced by ``{"__tensor__": key}``. Loading checks
the magic, the sizes, the checksum and the format version before reading anything, and never
unpickles: a pickle or ``torch.save`` file is refused with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import FORMAT_VERSION, __version__
from .errors import FormatError, NotFittedError
from .files import atomic_write

__all__ = ["dumps", "loads", "read_state", "write_state"]

MAGIC = b"\x89NSCORE\n"
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        while key in tensors:
            key += "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise FormatError(f"state dict keys must be strings, got {k!r}")
        return {k: _flatten(v, tensors, f"{prefix}/{k}" if prefix else k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise FormatError(f"cannot save a value of type {type(obj).__name__} at {prefix!r} (only JSON and tensors)")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def dumps(kind: str, state: dict[str, Any]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    jstate = _flatten(state, tensors, "")
    meta: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for k, t in tensors.items():
        if t.dtype not in _NAMES:
            raise FormatError(f"cannot save tensor {k!r} of dtype {t.dtype}")
        b = _tensor_bytes(t)
        meta[k] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": len(b)}
        blobs.append(b)
        offset += len(b)
    header = {
        "format_version": FORMAT_VERSION,
        "normscore_version": __version__,
        "kind": kind,
        "state": jstate,
        "tensors": meta,
        "data_nbytes": offset,
    }
    hb = json.dumps(header, allow_nan=True, sort_keys=True).encode("utf-8")
    body = MAGIC + struct.pack("<Q", len(hb)) + hb + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def _parse_header(raw: bytes) -> dict | None:
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return h if isinstance(h, dict) else None


def loads(data: bytes, source: str = "<bytes>") -> tuple[str, dict[str, Any]]:
    if not data.startswith(MAGIC):
        if data[:1] == b"\x80" or data[:2] == b"PK":
            raise FormatError(
                f"{source} looks like a pickle / torch.save file. normscore never loads pickles "
                "(they can run arbitrary code); save detectors with det.save(path)."
            )
        raise FormatError(f"{source} is not a normscore file (wrong magic bytes).")
    if len(data) < len(MAGIC) + 8 + 32:
        raise FormatError(f"{source} is truncated ({len(data)} bytes).")
    (hlen,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if start + hlen + 32 > len(data):
        raise FormatError(f"{source} is truncated: the header says {hlen} bytes, the file is shorter.")
    body, digest = data[:-32], data[-32:]
    header = _parse_header(data[start : start + hlen])
    try:
        expected = start + hlen + int(header["data_nbytes"]) if header is not None else None
    except (KeyError, TypeError, ValueError):
        expected = None
    if expected is not None and expected != len(body):
        raise FormatError(
            f"{source} is truncated or has trailing data: expected {expected + 32} bytes, found {len(data)}."
        )
    if hashlib.sha256(body).digest() != digest:
        raise FormatError(f"{source} failed its checksum: the file was modified or damaged after saving.")
    if header is None or "format_version" not in header:
        raise FormatError(f"{source} has no valid header; it is not a normscore file.")
    fv = header["format_version"]
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise FormatError(
            f"{source} was written with format version {fv} (normscore {header.get('normscore_version')}); "
            f"this normscore {__version__} reads format <= {FORMAT_VERSION}. Upgrade normscore."
        )
    blob = memoryview(data)[start + hlen : start + hlen + header["data_nbytes"]]
    tensors: dict[str, torch.Tensor] = {}
    for k, m in header["tensors"].items():
        dt = _DTYPES.get(m["dtype"])
        if dt is None:
            raise FormatError(f"{source}: unknown tensor dtype {m['dtype']!r}")
        raw = bytes(blob[m["offset"] : m["offset"] + m["nbytes"]])
        if dt == torch.bfloat16:
            arr = np.frombuffer(raw, dtype="<i2").copy()
            t = torch.from_numpy(arr).view(torch.bfloat16)
        elif dt == torch.bool:
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.bool_).copy())
        else:
            np_dt = torch.empty(0, dtype=dt).numpy().dtype.newbyteorder("<")
            t = torch.from_numpy(np.frombuffer(raw, dtype=np_dt).astype(np_dt.newbyteorder("="), copy=True))
        tensors[k] = t.reshape(m["shape"])
    return header["kind"], _unflatten(header["state"], tensors)


def write_state(
    path: str | os.PathLike, kind: str, state: Callable[[], dict[str, Any]], unfitted: Sequence[str] = ()
) -> None:
    """Write ``state()`` as an object of ``kind`` to ``path`` (atomically: written, then renamed).

    ``unfitted`` names the parts of the object that are not fitted; the file is refused then,
    because it would not score. ``state`` is called after the path is checked.
    """
    if unfitted:
        raise NotFittedError(
            f"{', '.join(unfitted)} {'is' if len(unfitted) == 1 else 'are'} not fitted: there is no "
            "fitted state to save, and the file would not score. Call fit(model, id_loader) before save()."
        )
    path = Path(path)
    if path.is_dir():
        raise FormatError(
            f"{str(path)!r} is a directory; save() writes one file. Pass a file path, e.g. {str(path / 'detector.ns')!r}."
        )
    if not path.parent.is_dir():
        raise FormatError(f"cannot save to {str(path)!r}: the folder {str(path.parent)!r} does not exist.")
    atomic_write(path, dumps(kind, state()))


def read_state(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(kind, state)`` of the file at ``path`` written by :func:`write_state`."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f.name for f in p.iterdir() if f.is_file())
        shown = f"; files in it: {files[:5]}{' ...' if len(files) > 5 else ''}" if files else "; it holds no files"
        raise FormatError(
            f"{str(p)!r} is a directory; load() reads the one file det.save(path) wrote (e.g. "
            f"{str(p / 'detector.ns')!r}){shown}."
        )
    if not p.is_file():
        raise FormatError(f"no file at {str(p)!r}.")
    return loads(p.read_bytes(), source=str(p))
