"""The service against a hostile client: zips that list more members than they hold room for,
uploads that declare a body and never send it, more held requests than Ray Serve queues, and who
can reach the sockets of the Ray it starts. The server tests run a real one (local Ray, Ray
Serve's HTTP proxy, a tiny random SAM) and talk to it with raw sockets on 127.0.0.1."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from samed_adapter.serve import uploads
from samed_adapter.serve.errors import PayloadTooLargeError, UnprocessableError

_CENTRAL = struct.Struct("<4s6H3L5H2L")  # a central directory header (PKWARE APPNOTE 4.3.12)


def _central_entries(count: int) -> bytes:
    """``count`` central directory headers of one-byte names (47 bytes each), no data behind them."""
    entry = _CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    return entry * count


def _zip64_listing(path: Path, count: int) -> None:
    """A zip whose central directory lists ``count`` members, with the zip64 end records that
    a count over 65535 needs (as zipfile writes them)."""
    directory = _central_entries(count)
    eocd64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(directory), 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(directory + eocd64 + locator + eocd)


def _refused_before_parsing(monkeypatch, archive: Path, into: Path) -> tuple[str, int]:
    """unpack_series on ``archive``: (its 413 message, the peak of Python memory it took), with
    zipfile.ZipFile replaced by a trap that records being built."""
    built = []
    monkeypatch.setattr(uploads.zipfile, "ZipFile", lambda *a, **k: built.append(a) or pytest.fail("ZipFile built"))
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLargeError) as err:
            uploads.unpack_series(archive, into, max_bytes=1 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not built and not into.exists()
    return str(err.value), peak


def test_a_zip_listing_a_million_members_is_refused_from_its_end_record(tmp_path, monkeypatch):
    """47 MB listing a million members: zipfile would build a million ZipInfo (0.4 GB) first."""
    archive = tmp_path / "million.zip"
    _zip64_listing(archive, 1_000_000)
    assert archive.stat().st_size > 45e6
    message, peak = _refused_before_parsing(monkeypatch, archive, tmp_path / "series")
    assert "the zip holds 1000000 files, more than a series (20000)" in message, message
    assert peak < 1 << 20, peak  # the end records only: about 64 KiB


def test_a_zip_whose_end_record_understates_its_members_is_refused(tmp_path, monkeypatch):
    """The end record says 3; the central directory holds 100000 (zipfile reads by its size)."""
    directory = _central_entries(100_000)
    archive = tmp_path / "liar.zip"
    archive.write_bytes(directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 3, 3, len(directory), 0, 0))
    message, peak = _refused_before_parsing(monkeypatch, archive, tmp_path / "series")
    assert "more than 20000 files" in message and peak < 1 << 20, (message, peak)


def test_zip64_counts_as_zipfile_writes_them(tmp_path):
    """A real zip64 archive (zipfile's own writer, 70000 members) is refused on its count; a
    small zip behind a prefix (data before the zip, which zipfile accepts) still unpacks."""
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as zf:
        for i in range(70_000):
            zf.writestr(f"{i}.dcm", b"")
    with pytest.raises(PayloadTooLargeError, match="the zip holds 70000 files"):
        uploads.check_zip_entries(big)
    small = io.BytesIO()
    with zipfile.ZipFile(small, "w") as zf:
        for i in range(3):
            zf.writestr(f"series/{i}.dcm", b"DICM" * (i + 1))
    (tmp_path / "small.zip").write_bytes(b"#!prefix\n" + small.getvalue())
    out = uploads.unpack_series(tmp_path / "small.zip", tmp_path / "series", max_bytes=1 << 20)
    assert sorted(p.read_bytes() for p in out.iterdir()) == [b"DICM", b"DICM" * 2, b"DICM" * 3]
    (tmp_path / "not.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UnprocessableError, match="not a readable zip"):
        uploads.unpack_series(tmp_path / "not.zip", tmp_path / "none", max_bytes=1 << 20)
