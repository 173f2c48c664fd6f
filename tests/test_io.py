"""Persistence: no pickle, checksums, truncation, future versions."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

import normscore
from normscore import io as nio
from normscore.errors import FormatError


def _saved(tmp_path, tiny_model, loader):
    det = normscore.create("energy", temperature=2.0).fit(tiny_model, loader)
    p = tmp_path / "d.ns"
    det.save(p)
    return p


def test_roundtrip_of_all_dtypes():
    state = {
        "a": torch.randn(3, 2, dtype=torch.float64),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.tensor([True, False]),
        "d": torch.randn(4).to(torch.bfloat16),
        "e": torch.randn(2).half(),
        "nested": {"list": [1, 2.5, "x", None, torch.ones(2)]},
    }
    kind, back = nio.loads(nio.dumps("test", state))
    assert kind == "test"
    for k in "abcde":
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k])
    assert back["nested"]["list"][:4] == [1, 2.5, "x", None]
    assert torch.equal(back["nested"]["list"][4], torch.ones(2))


def test_truncated_file(tmp_path, tiny_model, loader):
    p = _saved(tmp_path, tiny_model, loader)
    data = p.read_bytes()
    for cut in (5, 20, len(data) - 1):
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="truncated|magic"):
            normscore.load(p)


def test_tampered_file(tmp_path, tiny_model, loader):
    p = _saved(tmp_path, tiny_model, loader)
    data = bytearray(p.read_bytes())
    i = data.index(b"temperature") + len(b'temperature": ')
    data[i] = ord("9")
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum|corrupt"):
        normscore.load(p)


def test_future_version(tmp_path, tiny_model, loader):
    p = _saved(tmp_path, tiny_model, loader)
    data = p.read_bytes()
    hlen = struct.unpack("<Q", data[8:16])[0]
    header = json.loads(data[16 : 16 + hlen])
    header["format_version"] = 999
    hb = json.dumps(header).encode()
    body = nio.MAGIC + struct.pack("<Q", len(hb)) + hb + data[16 + hlen : -32]
    import hashlib

    p.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(FormatError, match="format version 999.*Upgrade"):
        normscore.load(p)


def test_pickles_are_refused_without_unpickling(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    p = tmp_path / "evil.ns"
    p.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(FormatError, match="pickle"):
        normscore.load(p)
    torch.save({"a": torch.ones(1)}, tmp_path / "t.pt")
    with pytest.raises(FormatError, match="pickle"):
        normscore.load(tmp_path / "t.pt")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(FormatError, match="not a normscore file"):
        normscore.load(tmp_path / "x.txt")
    with pytest.raises(FormatError, match="no file"):
        normscore.load(tmp_path / "missing.ns")
