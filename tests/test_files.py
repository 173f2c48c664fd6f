"""One atomic-write helper (issue 13, item 10): every writer uses it, a failed write leaves the
old file and no temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from normscore.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_bytes_text_and_callback(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(str(p), "é\n")
    assert p.read_bytes() == "é\n".encode()
    atomic_write(p, lambda f: torch.save({"a": torch.arange(3)}, f))
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.arange(3))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]


def test_torch_archives_written_through_it_are_byte_reproducible(tmp_path):
    obj = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))}
    atomic_write(tmp_path / "a.pt", lambda f: torch.save(obj, f))
    atomic_write(tmp_path / "b.pt", lambda f: torch.save(obj, f))
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.txt"]


def test_no_other_module_renames_files_into_place():
    hits = [
        f"{f.relative_to(ROOT)}:{i}"
        for f in sorted((ROOT / "normscore").rglob("*.py"))
        if f.name != "files.py"
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if "os.replace(" in line or "os.rename(" in line
    ]
    assert not hits, f"write files with normscore.files.atomic_write: {hits}"
